// A loaded llama.cpp model and its vocabulary: shape, metadata, tokenizer,
// chat template. Errors are C++ exceptions (std::invalid_argument for bad
// input, std::runtime_error for failed llama.cpp calls); the binding turns
// them into Python exceptions. Nothing here aborts the process on bad input.
#pragma once

#include "llama.h"

#include <cstdint>
#include <string>
#include <vector>

struct psg_model {
    llama_model *       model = nullptr;
    const llama_vocab * vocab = nullptr;
    std::string         path;
    int32_t             n_open_contexts = 0;

    psg_model(const std::string & path, int32_t n_gpu_layers, bool use_mmap);
    ~psg_model();
    void close();
    void check_open() const;

    int32_t n_layer() const;
    int32_t n_head() const;
    int32_t n_head_kv() const;
    int32_t n_vocab() const;
    int64_t kv_bytes_per_cell() const; // K and V of one token, all layers, f16
    std::string meta(const std::string & key) const;

    std::vector<int32_t> tokenize(const std::string & text, bool add_special, bool parse_special) const;
    std::string detokenize(const std::vector<int32_t> & tokens, bool special) const;
    std::string token_bytes(int32_t token, bool special) const;
    bool is_eog(int32_t token) const;
    bool is_control(int32_t token) const;
    std::string chat_template(const std::vector<std::string> & roles, const std::vector<std::string> & contents,
                              bool add_assistant) const;
    uint64_t vocab_fingerprint() const;
    void check_token(int32_t token) const;
};

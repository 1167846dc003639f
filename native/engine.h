// A llama.cpp model and context with the operations pyspec-gguf needs:
// chunked decode with attention capture, sampling, KV removal and compaction.
// Errors are C++ exceptions (std::invalid_argument for bad input,
// std::runtime_error for failed llama.cpp calls); the binding turns them into
// Python exceptions. Nothing here aborts the process on bad input.
#pragma once

#include "capture.h"
#include "llama.h"

#include <cstdint>
#include <memory>
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
    int32_t n_ctx_train() const;
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

struct psg_context_params {
    uint32_t    n_ctx = 4096;
    uint32_t    n_batch = 512;
    uint32_t    n_ubatch = 512;
    int32_t     n_threads = 0; // 0: llama.cpp's default
    int32_t     n_seq_max = 1;
    std::string flash_attn = "off"; // "off", "on", "auto"
    std::string type_k = "f16";     // KV cache types: f16, bf16, f32, q8_0, q4_0, q4_1, q5_0, q5_1, iq4_nl
    std::string type_v = "f16";     // (a quantized V needs flash attention on)
};

struct psg_context {
    psg_model *          owner = nullptr;
    llama_context *      ctx = nullptr;
    psg_context_params   params;
    std::unique_ptr<psg_capture> capture;
    llama_sampler *      sampler = nullptr;

    // Mirror of the KV cells: cell -> position (-1: empty) and which
    // sequences use it (bit s). Needed to map attention columns (cells) to
    // positions. llama.cpp fills cells in order while there are no holes;
    // after a removal that leaves holes, the next decode may fill them
    // anywhere, so the layout becomes unknown until compaction rebuilds it.
    std::vector<int32_t>  cell_pos;
    std::vector<uint64_t> cell_seqs;
    bool                  layout_known = true;
    // After a per-head rewrite a cell holds different tokens in different
    // heads: its position no longer names one token.
    bool                  per_head = false;

    psg_context(psg_model * model, const psg_context_params & p);
    ~psg_context();
    void close();
    void check_open() const;

    uint32_t n_ctx() const;
    int32_t  pos_max(int32_t seq) const;  // -1 when the sequence is empty
    int32_t  pos_min(int32_t seq) const;
    int32_t  n_cells_used() const;
    int32_t  n_cells(int32_t seq) const;

    // Decodes tokens at positions pos0.. of `seq`. want: 0 = no logits,
    // 1 = logits of the last token, 2 = also log p(token[i+1] | ..token[i])
    // for every i, where token[n] is `next_token` if >= 0 (returned in
    // `logprobs`: n values, or n-1 without a next token).
    void decode(const std::vector<int32_t> & tokens, int32_t pos0, int32_t seq, int32_t want,
                std::vector<float> * logprobs, int32_t next_token);
    std::vector<float> logits_last() const;

    void sampler_set(float temperature, float top_p, uint32_t seed);
    int32_t sample();

    void capture_arm(const std::vector<int32_t> & layers, const std::vector<int32_t> & positions,
                     const std::vector<float> & weights, int32_t reduce);
    void capture_disarm();

    void seq_rm(int32_t seq, int32_t p0, int32_t p1);
    void seq_keep_positions(int32_t seq, const std::vector<int32_t> & positions);
    void seq_cp(int32_t src, int32_t dst, int32_t p0, int32_t p1);
    void clear();
    std::vector<uint8_t> state_get(int32_t seq) const;
    void state_set(int32_t seq, const std::vector<uint8_t> & blob);
    int64_t kv_bytes_per_cell() const; // K and V of one cell, all layers, in this context's cache types
    size_t kv_bytes(int32_t seq) const;
    int64_t kv_bytes_allocated() const;
    void compact(int32_t seq, uint32_t n_ctx_new);
    // Replaces the context's cells by the state `blob` of one sequence,
    // first resizing the context to n_ctx_new cells (0: keep its size).
    void load_state(int32_t seq, const std::vector<uint8_t> & blob, uint32_t n_ctx_new);
    // The state of `seq` rewritten so that cell i of layer l, KV head h holds
    // position keep[l][h][i] (keep is [n_layer, n_head_kv, n_keep]); the
    // cells get positions `cell_pos`. Checks the model and the blob first.
    std::vector<uint8_t> state_rewrite(const std::vector<uint8_t> & blob, const std::vector<int32_t> & keep,
                                       int32_t n_keep, const std::vector<int32_t> & cell_pos, int32_t seq) const;
    // Per-(layer, KV head) eviction: state_get, state_rewrite, load_state.
    void keep_per_head(int32_t seq, const std::vector<int32_t> & keep, int32_t n_keep,
                       const std::vector<int32_t> & cell_pos, uint32_t n_ctx_new);

private:
    llama_context * create(uint32_t n_ctx) const;
    void check_seq(int32_t seq) const;
    void mirror_remove(int32_t seq, int32_t p0, int32_t p1);
    void mirror_append(const int32_t * pos, int32_t n, int32_t seq);
    void mirror_from_blob(const std::vector<uint8_t> & blob);
    bool mirror_has_holes() const;
    int32_t last_logits_index = -1;
};

void psg_backend_init();

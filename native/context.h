// A llama.cpp context over a psg_model, with the operations pyspec-gguf
// needs: chunked decode with attention capture, sampling, KV removal and
// compaction, state save, load and per-head rewrite. Errors are C++
// exceptions (std::invalid_argument for bad input, std::runtime_error for
// failed llama.cpp calls); the binding turns them into Python exceptions.
// Nothing here aborts the process on bad input.
//
// The methods are defined by job: context.cpp (create, close, decode,
// logits, sampling, capture arming), kv_ops.cpp (positions, cells, removal,
// copy, sizes), state.cpp (state get/set/load, compaction, per-head rewrite).
#pragma once

#include "capture.h"
#include "heads.h"
#include "kv_cells.h"
#include "model.h"
#include "sampler.h"

#include "llama.h"

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

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

// A KV cache type by name: one of those llama.cpp accepts for K and V.
ggml_type psg_cache_type_parse(const std::string & s, const char * which);

struct psg_context {
    psg_model *          owner = nullptr;
    llama_context *      ctx = nullptr;
    psg_context_params   params;
    std::unique_ptr<psg_capture> capture;
    psg_sampler          sampler;
    psg_kv_cells         cells; // mirror of the KV cells, for capture and the cell counts
    // After a per-head rewrite a cell holds different tokens in different
    // heads: its position no longer names one token.
    bool                 per_head = false;

    psg_context(psg_model * model, const psg_context_params & p);
    ~psg_context();
    void close();
    void check_open() const;

    uint32_t n_ctx() const;
    int32_t  pos_max(int32_t seq) const;  // -1 when the sequence is empty
    int32_t  pos_min(int32_t seq) const;
    int32_t  n_cells(int32_t seq) const;

    // Decodes tokens at positions pos0.. of `seq`. want: 0 = no logits,
    // 1 = logits of the last token, 2 = also log p(token[i+1] | ..token[i])
    // for every i, where token[n] is `next_token` if >= 0 (returned in
    // `out`: n values, or n-1 without a next token), 3 = the logits of
    // every token (returned in `out`: n rows of n_vocab, row-major).
    void decode(const std::vector<int32_t> & tokens, int32_t pos0, int32_t seq, int32_t want,
                std::vector<float> * out, int32_t next_token);
    std::vector<float> logits_last() const;

    void sampler_set(float temperature, float top_p, uint32_t seed);
    int32_t sample();

    void capture_arm(const std::vector<int32_t> & layers, const std::vector<int32_t> & positions,
                     const std::vector<float> & weights, int32_t reduce, int32_t scoring = PSG_SCORING_AUTO);
    void capture_disarm();

    void seq_rm(int32_t seq, int32_t p0, int32_t p1);
    void seq_keep_positions(int32_t seq, const std::vector<int32_t> & positions);
    void seq_cp(int32_t src, int32_t dst, int32_t p0, int32_t p1);
    void clear();
    int64_t kv_bytes_per_cell() const; // K and V of one cell, all layers, in this context's cache types
    size_t kv_bytes(int32_t seq) const;
    int64_t kv_bytes_allocated() const;

    std::vector<uint8_t> state_get(int32_t seq) const;
    void state_set(int32_t seq, const std::vector<uint8_t> & blob);
    void compact(int32_t seq, uint32_t n_ctx_new);
    // Replaces the context's cells by the state `blob` of one sequence,
    // first resizing the context to n_ctx_new cells (0: keep its size).
    void load_state(int32_t seq, const std::vector<uint8_t> & blob, uint32_t n_ctx_new);
    // The state of `seq` rewritten so that cell i of layer l, KV head h holds
    // position keep[l][h][i] (keep is [n_layer, n_head_kv, n_keep]); the
    // cells get positions `cell_pos`. Checks the model and the blob first.
    std::vector<uint8_t> state_rewrite(const std::vector<uint8_t> & blob, const psg_keep & keep,
                                       const std::vector<int32_t> & cell_pos, int32_t seq) const;
    // Per-(layer, KV head) eviction: state_get, state_rewrite, load_state.
    void keep_per_head(int32_t seq, const psg_keep & keep, const std::vector<int32_t> & cell_pos,
                       uint32_t n_ctx_new);
    // The state of `seq` restricted to the cells at `positions` (strictly
    // increasing), as seq_keep_positions then state_get give it, but read
    // whole and cut on the host: after a scattered keep, a device backend
    // reads a transposed V one cell range at a time.
    std::vector<uint8_t> state_get_kept(int32_t seq, const std::vector<int32_t> & positions) const;

private:
    llama_context * create(uint32_t n_ctx) const;
    void check_seq(int32_t seq) const;
    psg_state_shape shape() const { return {owner->n_layer(), owner->n_head_kv()}; }
    int32_t last_logits_index = -1;
};

// Per-(layer, KV head) KV eviction by rewriting a sequence's state blob.
//
// llama.cpp evicts whole cells (a token in every layer and head). A cell's
// bytes can be rewritten, though: in the new state, cell i of layer l and KV
// head h carries the K and V slice of that (l, h)'s i-th kept token. RoPE is
// already applied to the stored K and attention ignores cell order, so the
// result is exact. The blob format and its checks are in state_blob.h.
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

struct llama_model;

struct psg_state_shape {
    int32_t n_layer = 0;   // the model's layer count
    int32_t n_head_kv = 0; // KV heads per layer
};

// The kept positions keep[l][h][i], row-major, with the shape they were given in.
struct psg_keep {
    std::vector<int32_t> pos;
    size_t n_layer = 0, n_head_kv = 0, n_keep = 0;
};

// Refuses models whose KV cache cannot be rewritten per head: recurrent or
// hybrid memory, sliding-window attention, M-RoPE (2D cell positions).
void psg_heads_check_model(const llama_model * model);
// keep must be [n_layer, n_head_kv, C >= 1]: it covers every layer and KV head.
void psg_keep_check_shape(const psg_keep & keep, const psg_state_shape & shape);

// Builds the state of one sequence `seq_out` holding C = keep.n_keep cells at
// positions `cell_pos` (C values, strictly increasing) in which cell i of
// layer l, KV head h holds the entry of position keep[l][h][i] of `blob`.
// Throws std::invalid_argument for a blob or selection it cannot handle,
// naming what is wrong.
std::vector<uint8_t> psg_rewrite_state(const std::vector<uint8_t> & blob, const psg_state_shape & shape,
                                       const psg_keep & keep, const std::vector<int32_t> & cell_pos, int32_t seq_out);

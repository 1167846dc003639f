// Per-(layer, KV head) KV eviction by rewriting a sequence's state blob.
//
// llama.cpp evicts whole cells (a token in every layer and head). A cell's
// bytes can be rewritten, though: in the new state, cell i of layer l and KV
// head h carries the K and V slice of that (l, h)'s i-th kept token. RoPE is
// already applied to the stored K and attention ignores cell order, so the
// result is exact. The blob is the one llama_state_seq_get_data writes for a
// plain KV cache in the pinned llama.cpp (src/llama-kv-cache.cpp,
// state_write); it has no version field, so every size is checked against
// what that build writes and anything else is refused.
#pragma once

#include <cstdint>
#include <vector>

struct psg_state_shape {
    int32_t n_layer = 0;   // the model's layer count
    int32_t n_head_kv = 0; // KV heads per layer
};

// Builds the state of one sequence `seq_out` holding C cells at positions
// `cell_pos` (C values, strictly increasing) in which cell i of layer l, KV
// head h holds the entry of position keep[(l * n_head_kv + h) * C + i] of
// `blob`. Throws std::invalid_argument for a blob or selection it cannot
// handle, naming what is wrong.
std::vector<uint8_t> psg_rewrite_state(const std::vector<uint8_t> & blob, const psg_state_shape & shape,
                                       const std::vector<int32_t> & keep, int32_t n_keep,
                                       const std::vector<int32_t> & cell_pos, int32_t seq_out);

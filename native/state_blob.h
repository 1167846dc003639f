// The state blob of one sequence, as llama_state_seq_get_data writes it for a
// plain KV cache in the pinned llama.cpp (src/llama-kv-cache.cpp,
// state_write): a header, the cell list, then per layer the K rows and the V
// rows (or V transposed). The blob has no version field, so every size is
// checked against what that build writes and anything else is refused with
// std::invalid_argument naming what is wrong. The one parser of the format:
// the per-head rewrite reads all of it, a state load reads its cells.
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

// llama_context's io_magic for sequence states (src/llama-context.cpp)
constexpr uint32_t PSG_STATE_SEQ_MAGIC = 0xaf143cd8;

// One layer's K (or row-major V) rows, or one layer's transposed V.
struct psg_state_tensor {
    int32_t  type = 0;
    uint64_t row_bytes = 0; // K / row-major V: bytes of one cell's row
    uint32_t el_bytes = 0;  // transposed V: bytes of one element
    uint32_t n_embd = 0;    // transposed V: rows (n_embd_v_gqa)
    size_t   data = 0;      // offset of the data in the blob
};

struct psg_state_blob {
    int32_t              seq = 0;  // the sequence id the blob names
    std::vector<int32_t> cell_pos; // position of each cell, in blob order
    size_t               off = 0;  // where parsing stopped

    // filled by psg_state_read_layers
    uint32_t                      v_trans = 0;
    std::vector<psg_state_tensor> k, v; // per layer
};

// Reads the header (magic, one stream) and the cell list, each cell used by
// one sequence.
psg_state_blob psg_state_read_cells(const std::vector<uint8_t> & blob);
// Reads the rest: the K and V tensors of n_layer layers, up to the blob's end.
void psg_state_read_layers(const std::vector<uint8_t> & blob, psg_state_blob & st, int32_t n_layer);

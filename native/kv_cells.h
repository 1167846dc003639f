// Mirror of a context's KV cells: cell -> position (-1: empty) and which
// sequences use it (bit s). Needed to map attention columns (cells) to
// positions. llama.cpp fills cells in order while there are no holes; after a
// removal that leaves holes, the next decode may fill them anywhere, so the
// layout becomes unknown until compaction rebuilds it.
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

struct psg_kv_cells {
    std::vector<int32_t>  pos;
    std::vector<uint64_t> seqs;
    bool                  layout_known = true;

    // Forgets every cell; the (empty) layout is known again.
    void clear();
    int32_t n_used() const;
    int32_t n_seq(int32_t seq) const; // cells used by `seq`
    bool has_holes() const;
    // True when no cell is used by a sequence other than `seq`.
    bool holds_only(int32_t seq) const;

    // Cells of tokens at positions pos[0..n) of `seq`, as llama_decode is about to fill them.
    void append(const int32_t * pos, int32_t n, int32_t seq);
    // Drops the cells from n on (a decode that failed).
    void truncate(size_t n);
    // What llama_memory_seq_rm / llama_memory_seq_cp do to the cells (p < 0: no bound).
    void seq_rm(int32_t seq, int32_t p0, int32_t p1);
    void seq_cp(int32_t src, int32_t dst, int32_t p0, int32_t p1);
    // Cells of a state just loaded into an empty cache: llama.cpp places them
    // contiguously from cell 0, in order, all used by `seq`.
    void assign(const std::vector<int32_t> & positions, int32_t seq);
};

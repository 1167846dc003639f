#include "kv_cells.h"

#include <algorithm>
#include <climits>

void psg_kv_cells::clear() {
    pos.clear();
    seqs.clear();
    layout_known = true;
}

int32_t psg_kv_cells::n_used() const {
    int32_t n = 0;
    for (int32_t p : pos) {
        n += p >= 0;
    }
    return n;
}

int32_t psg_kv_cells::n_seq(int32_t seq) const {
    int32_t n = 0;
    for (uint64_t m : seqs) {
        n += (m >> seq) & 1;
    }
    return n;
}

bool psg_kv_cells::has_holes() const {
    return std::find(pos.begin(), pos.end(), -1) != pos.end();
}

bool psg_kv_cells::holds_only(int32_t seq) const {
    for (uint64_t m : seqs) {
        if (m != 0 && m != (1ull << seq)) {
            return false;
        }
    }
    return true;
}

void psg_kv_cells::append(const int32_t * p, int32_t n, int32_t seq) {
    if (has_holes()) {
        layout_known = false; // llama.cpp may have put these tokens into the holes
    }
    for (int32_t i = 0; i < n; ++i) {
        pos.push_back(p[i]);
        seqs.push_back(1ull << seq);
    }
}

void psg_kv_cells::truncate(size_t n) {
    pos.resize(n);
    seqs.resize(n);
}

// Cells of `seq` whose position is in [p0, p1); p < 0 is no bound, as in llama.cpp.
template <typename Fn> static void for_range(psg_kv_cells & cells, int32_t seq, int32_t p0, int32_t p1, Fn fn) {
    if (p0 < 0) p0 = 0;
    if (p1 < 0) p1 = INT32_MAX;
    for (size_t c = 0; c < cells.pos.size(); ++c) {
        if (cells.pos[c] >= p0 && cells.pos[c] < p1 && ((cells.seqs[c] >> seq) & 1)) {
            fn(c);
        }
    }
}

void psg_kv_cells::seq_rm(int32_t seq, int32_t p0, int32_t p1) {
    for_range(*this, seq, p0, p1, [&](size_t c) {
        seqs[c] &= ~(1ull << seq);
        if (seqs[c] == 0) {
            pos[c] = -1;
        }
    });
    while (!pos.empty() && pos.back() == -1) {
        pos.pop_back();
        seqs.pop_back();
    }
}

void psg_kv_cells::seq_cp(int32_t src, int32_t dst, int32_t p0, int32_t p1) {
    for_range(*this, src, p0, p1, [&](size_t c) { seqs[c] |= 1ull << dst; });
}

void psg_kv_cells::assign(const std::vector<int32_t> & positions, int32_t seq) {
    pos = positions;
    seqs.assign(positions.size(), 1ull << seq);
    layout_known = true;
}

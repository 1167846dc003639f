// KV cache operations of a context: positions and cells of a sequence,
// removal, copy, clearing, sizes. llama.cpp does the work; the cell mirror
// follows every change.
#include "context.h"

#include <stdexcept>

using std::invalid_argument;
using std::runtime_error;
using std::to_string;
using std::vector;

int32_t psg_context::pos_max(int32_t seq) const {
    check_open();
    check_seq(seq);
    return llama_memory_seq_pos_max(llama_get_memory(ctx), seq);
}

int32_t psg_context::pos_min(int32_t seq) const {
    check_open();
    check_seq(seq);
    return llama_memory_seq_pos_min(llama_get_memory(ctx), seq);
}

int32_t psg_context::n_cells(int32_t seq) const {
    check_open();
    check_seq(seq);
    return cells.n_seq(seq);
}

void psg_context::seq_rm(int32_t seq, int32_t p0, int32_t p1) {
    check_open();
    check_seq(seq);
    if (p1 >= 0 && p0 > p1) {
        throw invalid_argument("seq_rm: p0 > p1");
    }
    if (!llama_memory_seq_rm(llama_get_memory(ctx), seq, p0, p1)) {
        throw runtime_error("llama_memory_seq_rm(" + to_string(seq) + ", " + to_string(p0) + ", " +
                            to_string(p1) + ") failed: this memory type cannot remove a partial range");
    }
    cells.seq_rm(seq, p0, p1);
}

void psg_context::seq_keep_positions(int32_t seq, const vector<int32_t> & positions) {
    check_open();
    check_seq(seq);
    if (per_head) {
        throw invalid_argument("the KV cache holds per-head sets: positions no longer name tokens, so they cannot "
                               "be kept by position");
    }
    const int32_t pmax = pos_max(seq);
    for (size_t i = 0; i < positions.size(); ++i) {
        if (positions[i] < 0 || positions[i] > pmax) {
            throw invalid_argument("position " + to_string(positions[i]) + " out of range [0, " +
                                   to_string(pmax) + "] of sequence " + to_string(seq));
        }
        if (i > 0 && positions[i] <= positions[i - 1]) {
            throw invalid_argument("positions to keep must be strictly increasing");
        }
    }
    // remove the gaps between kept positions, merged into ranges
    int32_t next = 0;
    for (int32_t p : positions) {
        if (p > next) {
            seq_rm(seq, next, p);
        }
        next = p + 1;
    }
    if (next <= pmax) {
        seq_rm(seq, next, -1);
    }
}

void psg_context::seq_cp(int32_t src, int32_t dst, int32_t p0, int32_t p1) {
    check_open();
    check_seq(src);
    check_seq(dst);
    if (src == dst) {
        throw invalid_argument("seq_cp: source and destination are the same sequence");
    }
    llama_memory_seq_cp(llama_get_memory(ctx), src, dst, p0, p1);
    cells.seq_cp(src, dst, p0, p1);
}

void psg_context::clear() {
    check_open();
    per_head = false;
    llama_memory_clear(llama_get_memory(ctx), true);
    cells.clear();
    last_logits_index = -1;
}

int64_t psg_context::kv_bytes_per_cell() const {
    check_open();
    // the model's figure is for f16 K and V, two bytes a value
    const int64_t f16 = owner->kv_bytes_per_cell();
    const int64_t values = f16 / 2 / 2 / owner->n_layer(); // K (= V) values of one layer
    const ggml_type tk = psg_cache_type_parse(params.type_k, "type_k"), tv = psg_cache_type_parse(params.type_v, "type_v");
    if (tk == GGML_TYPE_F16 && tv == GGML_TYPE_F16) {
        return f16;
    }
    return owner->n_layer() * (int64_t) (ggml_row_size(tk, values) + ggml_row_size(tv, values));
}

size_t psg_context::kv_bytes(int32_t seq) const {
    check_open();
    check_seq(seq);
    return (size_t) n_cells(seq) * (size_t) kv_bytes_per_cell();
}

int64_t psg_context::kv_bytes_allocated() const {
    check_open();
    return (int64_t) llama_n_ctx(ctx) * kv_bytes_per_cell();
}

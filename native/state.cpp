// Sequence states of a context: get and set, load into a (resized) context,
// compaction, and the per-head rewrite (heads.cpp) loaded back.
#include "context.h"

#include "state_blob.h"
#include "transfers.h"

#include <stdexcept>

using std::invalid_argument;
using std::runtime_error;
using std::to_string;
using std::vector;

vector<uint8_t> psg_context::state_get(int32_t seq) const {
    check_open();
    check_seq(seq);
    const size_t size = llama_state_seq_get_size(ctx, seq);
    vector<uint8_t> blob(size);
    const size_t n = llama_state_seq_get_data(ctx, blob.data(), blob.size(), seq);
    if (n == 0 || n > size) {
        throw runtime_error("llama_state_seq_get_data failed for sequence " + to_string(seq));
    }
    psg_count_transfer(PSG_STATE_READ, n);
    blob.resize(n);
    return blob;
}

void psg_context::state_set(int32_t seq, const vector<uint8_t> & blob) {
    check_open();
    check_seq(seq);
    if (pos_max(seq) >= 0) {
        throw invalid_argument("state_set needs an empty sequence " + to_string(seq));
    }
    if (cells.n_used() > 0) {
        throw invalid_argument("state_set needs an empty context (other sequences hold cells)");
    }
    if (blob.size() < 16) {
        throw invalid_argument("KV state blob is too short");
    }
    // parse first so a malformed blob is refused before llama.cpp reads it;
    // refused, like a blob llama.cpp refuses, as a failed load
    psg_state_blob st;
    try {
        st = psg_state_read_cells(blob);
    } catch (const invalid_argument & e) {
        throw runtime_error(e.what());
    }
    if ((uint32_t) st.cell_pos.size() > llama_n_ctx(ctx)) {
        throw invalid_argument("KV state holds " + to_string(st.cell_pos.size()) + " cells, more than n_ctx");
    }
    const size_t n = llama_state_seq_set_data(ctx, blob.data(), blob.size(), seq);
    psg_count_transfer(PSG_STATE_WRITE, blob.size());
    if (n == 0) {
        llama_memory_clear(llama_get_memory(ctx), true);
        cells.clear();
        throw runtime_error("llama_state_seq_set_data refused the KV state (format or size mismatch)");
    }
    // the blob names its own sequence id; cells now belong to `seq`
    cells.assign(st.cell_pos, seq);
    last_logits_index = -1;
}

void psg_context::compact(int32_t seq, uint32_t n_ctx_new) {
    check_open();
    check_seq(seq);
    if (!cells.holds_only(seq)) {
        throw invalid_argument("compact needs a context that holds only sequence " + to_string(seq));
    }
    const int32_t used = n_cells(seq);
    if (n_ctx_new != 0 && (int64_t) n_ctx_new < used + 1) {
        throw invalid_argument("n_ctx " + to_string(n_ctx_new) + " is too small for the " + to_string(used) +
                               " kept cells plus one new token");
    }
    load_state(seq, state_get(seq), n_ctx_new);
}

void psg_context::load_state(int32_t seq, const vector<uint8_t> & blob, uint32_t n_ctx_new) {
    check_open();
    check_seq(seq);
    if (n_ctx_new != 0) {
        llama_context * fresh = create(n_ctx_new);
        llama_free(ctx);
        ctx = fresh;
        params.n_ctx = llama_n_ctx(ctx);
        cells.clear();
        last_logits_index = -1;
    } else {
        clear();
    }
    per_head = false;
    state_set(seq, blob);
}

vector<uint8_t> psg_context::state_rewrite(const vector<uint8_t> & blob, const psg_keep & keep,
                                           const vector<int32_t> & cell_pos, int32_t seq) const {
    check_open();
    psg_keep_check_shape(keep, shape());
    check_seq(seq);
    psg_heads_check_model(owner->model);
    return psg_rewrite_state(blob, shape(), keep, cell_pos, seq);
}

void psg_context::keep_per_head(int32_t seq, const psg_keep & keep, const vector<int32_t> & cell_pos,
                                uint32_t n_ctx_new) {
    check_open();
    psg_keep_check_shape(keep, shape());
    check_seq(seq);
    if (!cells.holds_only(seq)) {
        throw invalid_argument("keep_per_head needs a context that holds only sequence " + to_string(seq));
    }
    if (n_ctx_new != 0 && (int64_t) n_ctx_new < (int64_t) keep.n_keep + 1) {
        throw invalid_argument("n_ctx " + to_string(n_ctx_new) + " is too small for the " + to_string(keep.n_keep) +
                               " kept cells plus one new token");
    }
    vector<uint8_t> blob = state_rewrite(state_get(seq), keep, cell_pos, seq);
    load_state(seq, blob, n_ctx_new);
    per_head = true;
}

vector<uint8_t> psg_context::state_get_kept(int32_t seq, const vector<int32_t> & positions) const {
    check_open();
    check_seq(seq);
    if (positions.empty()) {
        throw invalid_argument("state_get_kept needs at least one position");
    }
    // the same positions in every layer and KV head: one set, and the cells keep their positions
    const psg_state_shape sh = shape();
    psg_keep keep;
    keep.n_layer = (size_t) sh.n_layer;
    keep.n_head_kv = (size_t) sh.n_head_kv;
    keep.n_keep = positions.size();
    keep.pos.reserve(keep.n_layer * keep.n_head_kv * keep.n_keep);
    for (size_t lh = 0; lh < keep.n_layer * keep.n_head_kv; ++lh) {
        keep.pos.insert(keep.pos.end(), positions.begin(), positions.end());
    }
    return state_rewrite(state_get(seq), keep, positions, seq);
}

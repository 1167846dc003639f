#include "capture.h"

#include "ggml-backend.h"
#include "ggml.h"

#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <stdexcept>
#include <string>

using std::invalid_argument;
using std::to_string;

static const char   k_softmax_prefix[] = "kq_soft_max-";
static const size_t k_softmax_prefix_len = sizeof(k_softmax_prefix) - 1;

void psg_capture::arm(const std::vector<int32_t> & layer_ids, const std::vector<int32_t> & positions,
                      const std::vector<float> & weights, psg_reduce how) {
    if (layer_ids.empty()) {
        throw invalid_argument("capture needs at least one layer");
    }
    std::vector<int32_t> seen(n_layer, 0);
    for (int32_t l : layer_ids) {
        if (l < 0 || l >= n_layer) {
            throw invalid_argument("layer " + to_string(l) + " out of range [0, " + to_string(n_layer) + ")");
        }
        if (seen[l]++) {
            throw invalid_argument("layer " + to_string(l) + " listed twice");
        }
    }
    if (positions.empty()) {
        throw invalid_argument("capture needs at least one query position");
    }
    for (int32_t p : positions) {
        if (p < 0) {
            throw invalid_argument("query position " + to_string(p) + " is negative");
        }
    }
    if (!weights.empty() && weights.size() != positions.size()) {
        throw invalid_argument("weights must be empty or as long as the query positions");
    }
    if (how != PSG_REDUCE_MAX && how != PSG_REDUCE_SUM) {
        throw invalid_argument("reduce must be 'max' or 'sum'");
    }
    layers = layer_ids;
    layer_slot.assign(n_layer, -1);
    for (size_t i = 0; i < layers.size(); ++i) {
        layer_slot[layers[i]] = (int32_t) i;
    }
    query_weight.clear();
    for (size_t i = 0; i < positions.size(); ++i) {
        query_weight[positions[i]] = weights.empty() ? 1.0f : weights[i];
    }
    reduce = how;
    scores.assign(layers.size(), std::vector<std::vector<float>>(n_head_kv));
    n_pos = 0;
    n_tensors_seen = 0;
    n_rows_seen = 0;
    error.clear();
    ubatch_rows.clear();
    ubatch_weights.clear();
    armed = true;
}

void psg_capture::disarm() {
    armed = false;
    ubatch_rows.clear();
    ubatch_weights.clear();
    query_weight.clear();
    scores.clear();
    buf.clear();
    buf.shrink_to_fit();
}

void psg_capture::set_ubatch(const psg_kv_cells & kv, const int32_t * pos, int32_t n_tokens) {
    cells = &kv;
    ubatch_tensors0 = n_tensors_seen;
    ubatch_rows.clear();
    ubatch_weights.clear();
    if (!armed) {
        return;
    }
    for (int32_t i = 0; i < n_tokens; ++i) {
        auto it = query_weight.find(pos[i]);
        if (it != query_weight.end()) {
            ubatch_rows.push_back(i);
            ubatch_weights.push_back(it->second);
        }
    }
}

void psg_capture::ubatch_discard() {
    ubatch_rows.clear();
}

void psg_capture::ubatch_finish() {
    if (ubatch_rows.empty()) {
        return;
    }
    ubatch_rows.clear();
    const int64_t seen = n_tensors_seen - ubatch_tensors0;
    const int64_t expect = (int64_t) layers.size();
    if (seen != expect) {
        throw std::runtime_error("attention capture saw " + to_string(seen) + " of " + to_string(expect) +
                                 " attention tensors" +
                                 (error.empty() ? " (is flash attention off?)" : ": " + error));
    }
}

psg_capture::taken psg_capture::take() {
    if (!armed) {
        throw std::runtime_error("capture is not armed");
    }
    taken t;
    t.n_layer = layers.size();
    t.n_head_kv = (size_t) n_head_kv;
    t.n_pos = (size_t) n_pos;
    t.scores.assign(t.n_layer * t.n_head_kv * t.n_pos, 0.0f);
    for (size_t l = 0; l < t.n_layer; ++l) {
        for (size_t g = 0; g < t.n_head_kv; ++g) {
            std::vector<float> & src = scores[l][g];
            std::copy(src.begin(), src.begin() + std::min(src.size(), t.n_pos),
                      t.scores.begin() + (l * t.n_head_kv + g) * t.n_pos);
            std::fill(src.begin(), src.end(), 0.0f);
        }
    }
    t.n_rows = n_rows_seen;
    n_rows_seen = 0;
    return t;
}

static int32_t softmax_layer(const ggml_tensor * t) {
    if (t->op != GGML_OP_SOFT_MAX || strncmp(t->name, k_softmax_prefix, k_softmax_prefix_len) != 0) {
        return -1;
    }
    char * end = nullptr;
    const long il = strtol(t->name + k_softmax_prefix_len, &end, 10);
    if (end == t->name + k_softmax_prefix_len) {
        return -1;
    }
    return (int32_t) il;
}

bool psg_capture::wants(const ggml_tensor * t) const {
    if (!armed || ubatch_rows.empty()) {
        return false;
    }
    const int32_t il = softmax_layer(t);
    return il >= 0 && il < n_layer && layer_slot[il] >= 0;
}

void psg_capture::reduce_tensor(ggml_tensor * t) {
    if (t->type != GGML_TYPE_F32) {
        if (error.empty()) {
            error = std::string("attention tensor ") + t->name + " is not float32";
        }
        return;
    }
    const int64_t n_kv     = t->ne[0];
    const int64_t n_tokens = t->ne[1];
    const int64_t n_heads  = t->ne[2];
    if (n_heads != n_head || t->ne[3] != 1) {
        if (error.empty()) {
            error = std::string("attention tensor ") + t->name + " has an unexpected shape";
        }
        return;
    }
    const int32_t slot = layer_slot[softmax_layer(t)];
    const int32_t group = n_head / n_head_kv;

    // Keys are KV cells; only cells that hold a position carry a score.
    const std::vector<int32_t> & cell_pos = cells->pos;
    const int64_t n_cells = std::min<int64_t>(n_kv, (int64_t) cell_pos.size());
    int32_t max_pos = -1;
    for (int64_t c = 0; c < n_cells; ++c) {
        max_pos = std::max(max_pos, cell_pos[c]);
    }
    if (max_pos + 1 > n_pos) {
        n_pos = max_pos + 1;
    }
    for (auto & per_head : scores[slot]) {
        if ((int32_t) per_head.size() < n_pos) {
            per_head.resize(n_pos, 0.0f);
        }
    }

    // Read each run of consecutive observation rows of one head in one copy.
    const bool rows_packed = t->nb[1] == (size_t) n_kv * sizeof(float);
    size_t r = 0;
    while (r < ubatch_rows.size()) {
        size_t r_end = r + 1;
        if (rows_packed) {
            while (r_end < ubatch_rows.size() && ubatch_rows[r_end] == ubatch_rows[r_end - 1] + 1) {
                ++r_end;
            }
        }
        const int64_t n_run = (int64_t) (r_end - r);
        if (ubatch_rows[r_end - 1] >= n_tokens) {
            if (error.empty()) {
                error = std::string("attention tensor ") + t->name + " has fewer rows than the ubatch";
            }
            return;
        }
        buf.resize((size_t) (n_run * n_kv));
        for (int64_t h = 0; h < n_heads; ++h) {
            const size_t offset = (size_t) ubatch_rows[r] * t->nb[1] + (size_t) h * t->nb[2];
            ggml_backend_tensor_get(t, buf.data(), offset, (size_t) (n_run * n_kv) * sizeof(float));
            std::vector<float> & out = scores[slot][h / group];
            for (int64_t i = 0; i < n_run; ++i) {
                const float   w   = ubatch_weights[r + i];
                const float * row = buf.data() + i * n_kv;
                if (reduce == PSG_REDUCE_MAX) {
                    for (int64_t c = 0; c < n_cells; ++c) {
                        const int32_t p = cell_pos[c];
                        if (p >= 0) {
                            out[p] = std::max(out[p], w * row[c]);
                        }
                    }
                } else {
                    for (int64_t c = 0; c < n_cells; ++c) {
                        const int32_t p = cell_pos[c];
                        if (p >= 0) {
                            out[p] += w * row[c];
                        }
                    }
                }
            }
        }
        n_rows_seen += n_run;
        r = r_end;
    }
    n_tensors_seen++;
}

bool psg_capture_eval_cb(ggml_tensor * t, bool ask, void * user_data) {
    auto * cap = static_cast<psg_capture *>(user_data);
    if (ask) {
        // Every tensor asked for splits the graph: ask only while armed, and
        // only for the wanted layers of a ubatch that holds observation rows.
        const bool want = cap->wants(t);
        cap->n_asked += want;
        return want;
    }
    if (cap->wants(t)) {
        const auto t0 = std::chrono::steady_clock::now();
        cap->reduce_tensor(t);
        cap->reduce_seconds += std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    }
    return true;
}

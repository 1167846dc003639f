#include "capture.h"

#include "attention_rows.h"
#include "transfers.h"

#include "ggml-backend.h"
#include "ggml.h"

#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <cmath>
#include <stdexcept>
#include <string>
#include <thread>

using std::invalid_argument;
using std::to_string;

static const char   k_softmax_prefix[] = "kq_soft_max-";
static const size_t k_softmax_prefix_len = sizeof(k_softmax_prefix) - 1;

void psg_capture::arm(const std::vector<int32_t> & layer_ids, const std::vector<int32_t> & positions,
                      const std::vector<float> & weights, psg_reduce how, psg_scoring where) {
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
    if (where != PSG_SCORING_AUTO && where != PSG_SCORING_GRAPH && where != PSG_SCORING_HOST) {
        throw invalid_argument("scoring must be 'auto', 'graph' or 'host'");
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
    scoring = where;
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
    keys.clear();
    keys.shrink_to_fit();
    raw.clear();
    raw.shrink_to_fit();
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
                                 (error.empty() ? "" : ": " + error));
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

// The layer of a flash-attention node, from the name of the query tensor it
// reads (a view of the post-RoPE `Qcur-<layer>`); -1 for any other node.
static int32_t flash_layer(const ggml_tensor * t) {
    if (t->op != GGML_OP_FLASH_ATTN_EXT || t->src[0] == nullptr) {
        return -1;
    }
    const ggml_tensor * q = t->src[0];
    while (q->view_src != nullptr) {
        q = q->view_src;
    }
    static const char prefix[] = "Qcur-";
    if (strncmp(q->name, prefix, sizeof(prefix) - 1) != 0) {
        return -1;
    }
    char * end = nullptr;
    const long il = strtol(q->name + sizeof(prefix) - 1, &end, 10);
    return end == q->name + sizeof(prefix) - 1 ? -1 : (int32_t) il;
}

static int32_t attention_layer(const ggml_tensor * t) {
    const int32_t il = softmax_layer(t);
    return il >= 0 ? il : flash_layer(t);
}

bool psg_capture::wants(const ggml_tensor * t) const {
    if (!armed || ubatch_rows.empty()) {
        return false;
    }
    const int32_t il = attention_layer(t);
    return il >= 0 && il < n_layer && layer_slot[il] >= 0;
}

int64_t psg_capture::cover_cells(int32_t slot, int64_t n_kv) {
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
    return n_cells;
}

void psg_capture::accumulate(std::vector<float> & out, const float * probs, float w, int64_t n_cells) const {
    const std::vector<int32_t> & cell_pos = cells->pos;
    if (reduce == PSG_REDUCE_MAX) {
        for (int64_t c = 0; c < n_cells; ++c) {
            const int32_t p = cell_pos[c];
            if (p >= 0) {
                out[p] = std::max(out[p], w * probs[c]);
            }
        }
    } else {
        for (int64_t c = 0; c < n_cells; ++c) {
            const int32_t p = cell_pos[c];
            if (p >= 0) {
                out[p] += w * probs[c];
            }
        }
    }
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
    const int64_t n_cells = cover_cells(slot, n_kv);

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
            psg_count_transfer(PSG_CAPTURE_READ, (size_t) (n_run * n_kv) * sizeof(float));
            std::vector<float> & out = scores[slot][h / group];
            for (int64_t i = 0; i < n_run; ++i) {
                accumulate(out, buf.data() + i * n_kv, ubatch_weights[r + i], n_cells);
            }
        }
        n_rows_seen += n_run;
        r = r_end;
    }
    n_tensors_seen++;
}

void psg_capture::reduce_flash(ggml_tensor * t, int32_t il) {
    auto fail = [&](const std::string & why) {
        if (error.empty()) {
            error = "flash attention of layer " + to_string(il) + ": " + why;
        }
    };
    const ggml_tensor * q = t->src[0];
    const ggml_tensor * k = t->src[1];
    const ggml_tensor * mask = t->src[3];
    float scale = 0.0f, max_bias = 0.0f, softcap = 0.0f;
    memcpy(&scale, (const float *) t->op_params + 0, sizeof(float));
    memcpy(&max_bias, (const float *) t->op_params + 1, sizeof(float));
    memcpy(&softcap, (const float *) t->op_params + 2, sizeof(float));
    if (t->src[4] != nullptr) {
        return fail("attention sinks are not supported");
    }
    if (max_bias != 0.0f) {
        return fail("ALiBi is not supported");
    }
    if (q->type != GGML_TYPE_F32 || q->nb[0] != sizeof(float)) {
        return fail("the queries are not float32");
    }
    const int64_t hd = q->ne[0], n_tokens = q->ne[1];
    if (q->ne[2] != n_head || q->ne[3] != 1 || k->ne[0] != hd || k->ne[2] != n_head_kv || k->ne[3] != 1) {
        return fail("unexpected query or key shape");
    }
    // one token's queries, and one cell's keys, are packed head after head
    if (q->nb[2] != (size_t) hd * sizeof(float) || k->nb[2] != ggml_row_size(k->type, hd) ||
        k->nb[1] != k->nb[2] * (size_t) n_head_kv) {
        return fail("unexpected query or key layout");
    }
    const auto * traits = ggml_get_type_traits(k->type);
    if (k->type != GGML_TYPE_F32 && traits->to_float == nullptr) {
        return fail(std::string("keys of type ") + ggml_type_name(k->type) + " cannot be read as float");
    }
    const int64_t n_kv = k->ne[1];
    if (mask == nullptr || mask->type != GGML_TYPE_F16 || mask->ne[0] != n_kv || mask->ne[2] != 1 ||
        mask->ne[3] != 1) {
        return fail("unexpected mask");
    }
    if (ubatch_rows.back() >= n_tokens || ubatch_rows.back() >= mask->ne[1]) {
        return fail("fewer query rows than the ubatch");
    }
    const int32_t slot = layer_slot[il];
    const int64_t n_cells = cover_cells(slot, n_kv);
    if (n_cells == 0) {
        n_tensors_seen++;
        return;
    }
    const bool keys_away = psg_attention_graph::keys_off_host(k);
    if (scoring == PSG_SCORING_GRAPH || (scoring == PSG_SCORING_AUTO && keys_away && !graph_failed)) {
        std::string why;
        if (reduce_flash_graph(t, slot, n_cells, scale, softcap, why)) {
            n_rows_seen += (int64_t) ubatch_rows.size();
            n_tensors_seen++;
            return;
        }
        if (scoring == PSG_SCORING_GRAPH) {
            return fail("scoring on its backend: " + why);
        }
        graph_failed = true;  // and score on the host from now on
    }

    // The cells' keys as float, transposed per KV group: keys[(g * hd + d) * n_cells + c].
    const int64_t n_key = n_cells * n_head_kv * hd;
    raw.resize((size_t) n_cells * k->nb[1]);
    ggml_backend_tensor_get(k, raw.data(), 0, raw.size());
    psg_count_transfer(PSG_CAPTURE_READ, raw.size());
    buf.resize((size_t) n_key);
    if (k->type == GGML_TYPE_F32) {
        memcpy(buf.data(), raw.data(), raw.size());
    } else {
        traits->to_float(raw.data(), buf.data(), n_key);
    }
    keys.resize((size_t) n_key);
    for (int64_t c = 0; c < n_cells; ++c) {
        const float * row = buf.data() + c * n_head_kv * hd;
        for (int64_t gd = 0; gd < n_head_kv * hd; ++gd) {
            keys[(size_t) (gd * n_cells + c)] = row[gd];
        }
    }

    // Every observation row's queries and mask first, so the KV groups' threads start once per layer.
    const int32_t group = n_head / n_head_kv;
    const size_t n_rows = ubatch_rows.size();
    std::vector<float> queries(n_rows * (size_t) (n_head * hd));
    std::vector<float> masks(n_rows * (size_t) n_cells);
    std::vector<ggml_fp16_t> mask16((size_t) n_kv);
    for (size_t i = 0; i < n_rows; ++i) {
        const int64_t row = ubatch_rows[i];
        ggml_backend_tensor_get(q, queries.data() + i * (size_t) (n_head * hd), (size_t) row * q->nb[1],
                                (size_t) (n_head * hd) * sizeof(float));
        ggml_backend_tensor_get(mask, mask16.data(), (size_t) row * mask->nb[1], mask16.size() * sizeof(ggml_fp16_t));
        psg_count_transfer(PSG_CAPTURE_READ, (size_t) (n_head * hd) * sizeof(float));
        psg_count_transfer(PSG_CAPTURE_READ, mask16.size() * sizeof(ggml_fp16_t));
        ggml_fp16_to_fp32_row(mask16.data(), masks.data() + i * (size_t) n_cells, n_cells);
    }
    // KV groups in parallel: each writes only its own scores, rows in order as the softmax path does
    auto run_groups = [&](int32_t g0, int32_t g1) {
        std::vector<float> probs((size_t) n_cells);
        for (int32_t g = g0; g < g1; ++g) {
            const float * kt = keys.data() + (size_t) g * hd * n_cells;
            for (size_t i = 0; i < n_rows; ++i) {
                const float * query = queries.data() + i * (size_t) (n_head * hd);
                for (int32_t h = g * group; h < (g + 1) * group; ++h) {
                    if (psg_attention_row(query + (size_t) h * hd, kt, hd, n_cells, scale, softcap,
                                          masks.data() + i * (size_t) n_cells, probs.data())) {
                        accumulate(scores[slot][g], probs.data(), ubatch_weights[i], n_cells);
                    }
                }
            }
        }
    };
    const int32_t n_workers = std::max(1, std::min(n_threads, n_head_kv));
    if (n_workers == 1) {
        run_groups(0, n_head_kv);
    } else {
        std::vector<std::thread> workers;
        for (int32_t w = 0; w < n_workers; ++w) {
            workers.emplace_back(run_groups, n_head_kv * w / n_workers, n_head_kv * (w + 1) / n_workers);
        }
        for (auto & w : workers) {
            w.join();
        }
    }
    n_rows_seen += (int64_t) ubatch_rows.size();
    n_tensors_seen++;
}

bool psg_capture::reduce_flash_graph(const ggml_tensor * t, int32_t slot, int64_t n_cells, float scale,
                                     float softcap, std::string & why) {
    if (!graph) {
        graph = std::make_unique<psg_attention_graph>();
    }
    psg_attention_inputs in;
    in.q = t->src[0];
    in.k = t->src[1];
    in.mask = t->src[3];
    in.n_cells = n_cells;
    in.scale = scale;
    in.softcap = softcap;
    in.reduce_max = reduce == PSG_REDUCE_MAX;
    // one graph per run of consecutive observation rows (usually one run);
    // the scores are added only once every run is scored, so that a backend
    // that fails half way leaves nothing for the host path to count twice
    std::vector<std::vector<float>> runs;
    size_t r = 0;
    while (r < ubatch_rows.size()) {
        size_t r_end = r + 1;
        while (r_end < ubatch_rows.size() && ubatch_rows[r_end] == ubatch_rows[r_end - 1] + 1) {
            ++r_end;
        }
        in.row0 = ubatch_rows[r];
        in.n_rows = (int64_t) (r_end - r);
        in.weights = ubatch_weights.data() + r;
        runs.emplace_back();
        if (!graph->score(in, n_threads, runs.back(), why)) {
            return false;
        }
        r = r_end;
    }
    for (const std::vector<float> & reduced : runs) {
        for (int32_t g = 0; g < n_head_kv; ++g) {
            accumulate(scores[slot][g], reduced.data() + (size_t) g * n_cells, 1.0f, n_cells);
        }
    }
    return true;
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
        const int32_t il = flash_layer(t);
        if (il >= 0) {
            cap->reduce_flash(t, il);
        } else {
            cap->reduce_tensor(t);
        }
        cap->reduce_seconds += std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    }
    return true;
}

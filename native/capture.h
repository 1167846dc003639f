// Attention capture: one score per (layer, KV head, key position) from the
// eval callback. With flash attention off llama.cpp computes the softmax
// (`kq_soft_max-<layer>`) and the observation rows are read from it; with it
// on there is no softmax tensor, so the flash-attention node's own inputs
// (post-RoPE queries, the layer's cached keys, the mask) are read and the
// observation rows' softmax is computed here, the same reductions after.
#pragma once

#include "attention_graph.h"
#include "kv_cells.h"

#include <cstdint>
#include <memory>
#include <string>
#include <unordered_map>
#include <vector>

struct ggml_tensor;

enum psg_reduce : int32_t {
    PSG_REDUCE_MAX = 0,
    PSG_REDUCE_SUM = 1,
};

// Where the flash-attention path computes the observation rows' softmax:
// AUTO, on the backend that holds the keys where the host cannot read them
// directly (a GPU), else on the host; GRAPH, always as a ggml graph on that
// backend; HOST, always on the host.
enum psg_scoring : int32_t {
    PSG_SCORING_AUTO = 0,
    PSG_SCORING_GRAPH = 1,
    PSG_SCORING_HOST = 2,
};

struct psg_capture {
    // model shape, fixed for the life of the context
    int32_t n_layer   = 0;
    int32_t n_head    = 0;
    int32_t n_head_kv = 0;
    int32_t n_threads = 1; // for the flash-attention path's own softmax

    // what is armed
    bool                               armed = false;
    psg_reduce                         reduce = PSG_REDUCE_MAX;
    psg_scoring                        scoring = PSG_SCORING_AUTO;
    std::vector<int32_t>               layers;       // captured layer ids, in output order
    std::vector<int32_t>               layer_slot;   // layer id -> index in `layers`, or -1
    std::unordered_map<int32_t, float> query_weight; // query position -> row weight

    // set by the decode loop before each llama_decode (one ubatch per call)
    std::vector<int32_t>  ubatch_rows;    // rows of this ubatch that are observation queries
    std::vector<float>    ubatch_weights; // their weights
    const psg_kv_cells *  cells = nullptr; // the context's KV cells, to map columns to positions
    int64_t               ubatch_tensors0 = 0; // n_tensors_seen when the ubatch was set

    // result: scores[slot][kv_head][position]
    std::vector<std::vector<std::vector<float>>> scores;
    int32_t n_pos = 0;            // positions covered by `scores`
    int64_t n_tensors_seen = 0;   // kq_soft_max tensors reduced since arming
    int64_t n_rows_seen    = 0;   // observation rows reduced since arming
    int64_t n_asked        = 0;   // tensors requested from the scheduler, ever
    double  reduce_seconds = 0.0; // time spent reading and reducing rows, ever
    std::string error;            // first problem seen inside the callback

    std::vector<float> buf;       // scratch for rows read from the backend
    std::vector<float> keys;      // the flash-attention path's keys, as float
    std::vector<uint8_t> raw;     // and as the cache stores them
    std::unique_ptr<psg_attention_graph> graph; // the flash-attention path on the keys' backend
    bool graph_failed = false;    // AUTO found the backend unable to run it: the host path since

    // Checks the request (std::invalid_argument), then arms: scores start at zero.
    void arm(const std::vector<int32_t> & layer_ids, const std::vector<int32_t> & positions,
             const std::vector<float> & weights, psg_reduce how, psg_scoring where = PSG_SCORING_AUTO);
    void disarm();
    // Selects the observation rows of the next ubatch, given its token
    // positions, whose keys are the cells `kv` (with the ubatch's own cells
    // already appended).
    void set_ubatch(const psg_kv_cells & kv, const int32_t * pos, int32_t n_tokens);
    // After llama_decode ran the ubatch: forgets it and, when it held
    // observation rows, checks that every armed layer was reduced.
    void ubatch_finish();
    // After llama_decode failed: forgets the ubatch.
    void ubatch_discard();
    bool wants(const ggml_tensor * t) const;
    void reduce_tensor(ggml_tensor * t);
    // The flash-attention path: a FLASH_ATTN_EXT node of layer `il`.
    void reduce_flash(ggml_tensor * t, int32_t il);
    // Its scores computed by a graph on the keys' backend; false where that
    // backend cannot run it (`why` says so).
    bool reduce_flash_graph(const ggml_tensor * t, int32_t slot, int64_t n_cells, float scale, float softcap,
                            std::string & why);
    // Adds one row of attention probabilities over the KV cells into the
    // slot's per-head scores, as `reduce` says.
    void accumulate(std::vector<float> & out, const float * probs, float w, int64_t n_cells) const;
    // Makes room for the positions the cells hold; returns how many cells
    // (columns) carry a position.
    int64_t cover_cells(int32_t slot, int64_t n_kv);

    // Scores so far as [layer slot][KV head][position], flat, and the number of
    // query rows reduced; resets both to zero and stays armed.
    struct taken {
        std::vector<float> scores;
        size_t             n_layer = 0, n_head_kv = 0, n_pos = 0;
        int64_t            n_rows = 0;
    };
    taken take();
};

// The llama.cpp eval callback; user data is a psg_capture.
bool psg_capture_eval_cb(ggml_tensor * t, bool ask, void * user_data);

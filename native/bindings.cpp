// Python bindings: glue only (argument conversion, GIL release; nanobind
// turns std::invalid_argument into ValueError, std::runtime_error into
// RuntimeError). The work is in model.cpp, context.cpp and the files beside.
#include "context.h"
#include "transfers.h"

#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/vector.h>

#include <atomic>
#include <cstring>

namespace nb = nanobind;
using namespace nb::literals;

using i32_array = nb::ndarray<const int32_t, nb::ndim<1>, nb::c_contig, nb::device::cpu>;
using f32_array = nb::ndarray<const float, nb::ndim<1>, nb::c_contig, nb::device::cpu>;

using i32_grid = nb::ndarray<const int32_t, nb::ndim<3>, nb::c_contig, nb::device::cpu>;

static std::vector<int32_t> to_vec(const i32_array & a) {
    return std::vector<int32_t>(a.data(), a.data() + a.shape(0));
}

static std::vector<uint8_t> to_blob(const nb::bytes & b) {
    const uint8_t * p = reinterpret_cast<const uint8_t *>(b.c_str());
    return std::vector<uint8_t>(p, p + b.size());
}

static nb::bytes to_bytes(const std::vector<uint8_t> & v) {
    return nb::bytes(reinterpret_cast<const char *>(v.data()), v.size());
}

static psg_keep to_keep(const i32_grid & keep) {
    psg_keep k;
    k.pos.assign(keep.data(), keep.data() + keep.size());
    k.n_layer = keep.shape(0);
    k.n_head_kv = keep.shape(1);
    k.n_keep = keep.shape(2);
    return k;
}

template <typename T>
static nb::ndarray<nb::numpy, T> owned_array(std::vector<T> && v, std::initializer_list<size_t> shape) {
    auto * heap = new std::vector<T>(std::move(v));
    nb::capsule owner(heap, [](void * p) noexcept { delete static_cast<std::vector<T> *>(p); });
    return nb::ndarray<nb::numpy, T>(heap->data(), shape, owner);
}

// ---------------------------------------------------------------- logging
// llama.cpp and ggml log through one callback; messages at or above the
// threshold go to a Python function (the `pyspec_gguf` logger).

static std::atomic<int> g_log_threshold{GGML_LOG_LEVEL_ERROR};
static nb::object * g_log_sink = nullptr;
static std::atomic<int> g_log_last_level{GGML_LOG_LEVEL_INFO};

static void log_callback(enum ggml_log_level level, const char * text, void *) {
    int lvl = level;
    if (level == GGML_LOG_LEVEL_CONT) {
        lvl = g_log_last_level.load();
    } else {
        g_log_last_level.store(lvl);
    }
    if (lvl < g_log_threshold.load() || g_log_sink == nullptr || !Py_IsInitialized()) {
        return;
    }
    nb::gil_scoped_acquire gil;
    try {
        (*g_log_sink)(lvl, nb::str(text));
    } catch (...) {
        // a logging failure must never take the process down
    }
}

static void set_log_sink(nb::object sink, int threshold) {
    if (g_log_sink == nullptr) {
        g_log_sink = new nb::object();
    }
    *g_log_sink = sink;
    g_log_threshold.store(threshold);
    llama_log_set(log_callback, nullptr);
}

// ---------------------------------------------------------------- module

NB_MODULE(_native, m) {
    m.doc() = "pyspec-gguf native core over llama.cpp";

    m.def("set_log_sink", &set_log_sink, "sink"_a, "threshold"_a,
          "Route llama.cpp logs at or above `threshold` (a ggml log level) to sink(level, text).");
    m.def("llama_system_info", []() { return std::string(llama_print_system_info()); });
    m.def("supports_gpu_offload", []() { return llama_supports_gpu_offload(); });
    m.def("transfers", []() {
              nb::dict out;
              const char * names[PSG_TRANSFER_KINDS] = {"state_read", "state_write", "capture_read", "capture_write"};
              for (int k = 0; k < PSG_TRANSFER_KINDS; ++k) {
                  const psg_transfer_count c = psg_transfers((psg_transfer_kind) k);
                  out[names[k]] = nb::make_tuple(c.calls, c.bytes);
              }
              return out;
          },
          "Copies between llama.cpp's buffers and the host so far in this process, by kind "
          "(state_read, state_write, capture_read, capture_write): (calls, bytes) each.");
    m.attr("LOG_DEBUG") = (int) GGML_LOG_LEVEL_DEBUG;
    m.attr("LOG_INFO") = (int) GGML_LOG_LEVEL_INFO;
    m.attr("LOG_WARN") = (int) GGML_LOG_LEVEL_WARN;
    m.attr("LOG_ERROR") = (int) GGML_LOG_LEVEL_ERROR;

    nb::class_<psg_model>(m, "Model")
        .def("__init__",
             [](psg_model * self, const std::string & path, int32_t n_gpu_layers, bool use_mmap) {
                 nb::gil_scoped_release release;
                 new (self) psg_model(path, n_gpu_layers, use_mmap);
             },
             "path"_a, "n_gpu_layers"_a = -1, "use_mmap"_a = true)
        .def("close", &psg_model::close)
        .def_prop_ro("closed", [](const psg_model & m) { return m.model == nullptr; })
        .def_prop_ro("n_layer", &psg_model::n_layer)
        .def_prop_ro("n_head", &psg_model::n_head)
        .def_prop_ro("n_head_kv", &psg_model::n_head_kv)
        .def_prop_ro("n_vocab", &psg_model::n_vocab)
        .def_prop_ro("kv_bytes_per_cell", &psg_model::kv_bytes_per_cell)
        .def_prop_ro("per_head_rewritable",
                     [](const psg_model & m) {
                         m.check_open();
                         try {
                             psg_heads_check_model(m.model);
                             return true;
                         } catch (const std::invalid_argument &) {
                             return false;
                         }
                     },
                     "Whether the KV state can be rewritten per head (not recurrent, hybrid, sliding-window or "
                     "M-RoPE).")
        .def("meta", &psg_model::meta, "key"_a)
        .def("tokenize", [](const psg_model & m, const std::string & text, bool add_special, bool parse_special) {
                 std::vector<int32_t> t = m.tokenize(text, add_special, parse_special);
                 const size_t n = t.size();
                 return owned_array<int32_t>(std::move(t), {n});
             },
             "text"_a, "add_special"_a = true, "parse_special"_a = true)
        .def("detokenize", [](const psg_model & m, const i32_array & tokens, bool special) {
                 return m.detokenize(to_vec(tokens), special);
             },
             "tokens"_a, "special"_a = false)
        .def("token_bytes", [](const psg_model & m, int32_t token, bool special) {
                 std::string s = m.token_bytes(token, special);
                 return nb::bytes(s.data(), s.size());
             },
             "token"_a, "special"_a = false)
        .def("is_eog", &psg_model::is_eog, "token"_a)
        .def("is_control", &psg_model::is_control, "token"_a)
        .def("apply_chat_template", &psg_model::chat_template, "roles"_a, "contents"_a, "add_assistant"_a = true)
        .def("vocab_fingerprint", &psg_model::vocab_fingerprint, nb::call_guard<nb::gil_scoped_release>());

    nb::class_<psg_context>(m, "Context")
        .def("__init__",
             [](psg_context * self, psg_model * model, uint32_t n_ctx, uint32_t n_batch, uint32_t n_ubatch,
                int32_t n_threads, int32_t n_seq_max, const std::string & flash_attn, const std::string & type_k,
                const std::string & type_v) {
                 psg_context_params p;
                 p.n_ctx = n_ctx;
                 p.n_batch = n_batch;
                 p.n_ubatch = n_ubatch;
                 p.n_threads = n_threads;
                 p.n_seq_max = n_seq_max;
                 p.flash_attn = flash_attn;
                 p.type_k = type_k;
                 p.type_v = type_v;
                 nb::gil_scoped_release release;
                 new (self) psg_context(model, p);
             },
             "model"_a, "n_ctx"_a = 4096, "n_batch"_a = 512, "n_ubatch"_a = 512, "n_threads"_a = 0,
             "n_seq_max"_a = 1, "flash_attn"_a = "off", "type_k"_a = "f16", "type_v"_a = "f16",
             nb::keep_alive<1, 2>())
        .def_prop_ro("per_head", [](const psg_context & c) { return c.per_head; },
                     "True once keep_per_head rewrote the cache: cells hold different tokens per head.")
        .def("close", &psg_context::close)
        .def_prop_ro("closed", [](const psg_context & c) { return c.ctx == nullptr; })
        .def_prop_ro("n_ctx", &psg_context::n_ctx)
        .def_prop_ro("n_batch", [](const psg_context & c) { return c.params.n_batch; })
        .def_prop_ro("layout_known", [](const psg_context & c) { return c.cells.layout_known; })
        .def("pos_max", &psg_context::pos_max, "seq"_a = 0)
        .def("pos_min", &psg_context::pos_min, "seq"_a = 0)
        .def("n_cells", &psg_context::n_cells, "seq"_a = 0)
        .def("cell_positions", [](const psg_context & c) {
                 std::vector<int32_t> v = c.cells.pos;
                 const size_t n = v.size();
                 return owned_array<int32_t>(std::move(v), {n});
             },
             "Position held by each KV cell (-1: empty), as tracked for capture.")
        .def("decode",
             [](psg_context & c, const i32_array & tokens, int32_t pos0, int32_t seq, const std::string & want,
                int32_t next_token) {
                 int32_t w;
                 if (want == "none") w = 0;
                 else if (want == "last") w = 1;
                 else if (want == "logprobs") w = 2;
                 else if (want == "all") w = 3;
                 else throw std::invalid_argument("want must be 'none', 'last', 'logprobs' or 'all'");
                 std::vector<int32_t> toks = to_vec(tokens);
                 std::vector<float> out;
                 {
                     nb::gil_scoped_release release;
                     c.decode(toks, pos0, seq, w, w >= 2 ? &out : nullptr, next_token);
                 }
                 if (w == 3) {  // one row of logits per token
                     const size_t rows = toks.size(), cols = out.size() / toks.size();
                     return owned_array<float>(std::move(out), {rows, cols});
                 }
                 const size_t n = out.size();
                 return owned_array<float>(std::move(out), {n});
             },
             "tokens"_a, "pos0"_a, "seq"_a = 0, "want"_a = "last", "next_token"_a = -1)
        .def("logits", [](const psg_context & c) {
                 std::vector<float> v = c.logits_last();
                 const size_t n = v.size();
                 return owned_array<float>(std::move(v), {n});
             })
        .def("set_sampler", &psg_context::sampler_set, "temperature"_a = 0.0f, "top_p"_a = 1.0f, "seed"_a = 0)
        .def("sample", &psg_context::sample)
        .def("capture_arm",
             [](psg_context & c, const i32_array & layers, const i32_array & positions, nb::object weights,
                const std::string & reduce, const std::string & scoring) {
                 std::vector<float> w;
                 if (!weights.is_none()) {
                     f32_array wa = nb::cast<f32_array>(weights);
                     w.assign(wa.data(), wa.data() + wa.shape(0));
                 }
                 int32_t r;
                 if (reduce == "max") r = PSG_REDUCE_MAX;
                 else if (reduce == "sum") r = PSG_REDUCE_SUM;
                 else throw std::invalid_argument("reduce must be 'max' or 'sum', not '" + reduce + "'");
                 int32_t where;
                 if (scoring == "auto") where = PSG_SCORING_AUTO;
                 else if (scoring == "graph") where = PSG_SCORING_GRAPH;
                 else if (scoring == "host") where = PSG_SCORING_HOST;
                 else throw std::invalid_argument("scoring must be 'auto', 'graph' or 'host', not '" + scoring + "'");
                 c.capture_arm(to_vec(layers), to_vec(positions), w, r, where);
             },
             "layers"_a, "positions"_a, "weights"_a = nb::none(), "reduce"_a = "max", "scoring"_a = "auto",
             "Arms the capture. With flash attention on, `scoring` says where the observation rows' softmax "
             "is computed: 'graph', by a ggml graph on the backend that holds the keys (only the reduced "
             "scores come to the host); 'host', from the keys copied to the host; 'auto' (the default), "
             "'graph' where the keys live in device memory, else 'host'.")
        .def("capture_take",
             [](psg_context & c) {
                 psg_capture::taken t = c.capture->take();
                 const int64_t rows = t.n_rows;
                 return nb::make_tuple(owned_array<float>(std::move(t.scores), {t.n_layer, t.n_head_kv, t.n_pos}),
                                       rows);
             },
             "Scores so far as float32 [layer, kv_head, position] and the number of query rows "
             "reduced; resets them to zero and stays armed.")
        .def("capture_disarm", &psg_context::capture_disarm)
        .def_prop_ro("capture_armed", [](const psg_context & c) { return c.capture->armed; })
        .def_prop_ro("capture_n_asked", [](const psg_context & c) { return c.capture->n_asked; },
                     "Tensors the eval callback has asked the scheduler for (each one splits the graph).")
        .def_prop_ro("capture_seconds", [](const psg_context & c) { return c.capture->reduce_seconds; },
                     "Seconds spent reading and reducing attention rows in the eval callback.")
        .def("seq_rm", &psg_context::seq_rm, "seq"_a, "p0"_a, "p1"_a)
        .def("seq_keep_positions",
             [](psg_context & c, int32_t seq, const i32_array & positions) {
                 std::vector<int32_t> p = to_vec(positions);
                 nb::gil_scoped_release release;
                 c.seq_keep_positions(seq, p);
             },
             "seq"_a, "positions"_a)
        .def("seq_cp", &psg_context::seq_cp, "src"_a, "dst"_a, "p0"_a = -1, "p1"_a = -1)
        .def("clear", &psg_context::clear)
        .def("state_get",
             [](const psg_context & c, int32_t seq) {
                 std::vector<uint8_t> b;
                 {
                     nb::gil_scoped_release release;
                     b = c.state_get(seq);
                 }
                 return to_bytes(b);
             },
             "seq"_a = 0)
        .def("state_set",
             [](psg_context & c, int32_t seq, nb::bytes blob) {
                 std::vector<uint8_t> b = to_blob(blob);
                 nb::gil_scoped_release release;
                 c.state_set(seq, b);
             },
             "seq"_a, "blob"_a)
        .def("load_state",
             [](psg_context & c, int32_t seq, nb::bytes blob, uint32_t n_ctx) {
                 std::vector<uint8_t> b = to_blob(blob);
                 nb::gil_scoped_release release;
                 c.load_state(seq, b, n_ctx);
             },
             "seq"_a, "blob"_a, "n_ctx"_a = 0,
             "Replace the context's cells by a sequence state, first resizing it to n_ctx cells (0: as it is).")
        .def("state_rewrite",
             [](const psg_context & c, nb::bytes blob, const i32_grid & keep, const i32_array & cell_pos, int32_t seq) {
                 std::vector<uint8_t> b = to_blob(blob);
                 psg_keep k = to_keep(keep);
                 std::vector<int32_t> p = to_vec(cell_pos);
                 std::vector<uint8_t> out;
                 {
                     nb::gil_scoped_release release;
                     out = c.state_rewrite(b, k, p, seq);
                 }
                 return to_bytes(out);
             },
             "blob"_a, "keep"_a, "cell_pos"_a, "seq"_a = 0,
             "The state blob rewritten so that cell i of layer l, KV head h holds position keep[l, h, i]; the "
             "cells get positions cell_pos.")
        .def("keep_per_head",
             [](psg_context & c, int32_t seq, const i32_grid & keep, const i32_array & cell_pos, uint32_t n_ctx) {
                 psg_keep k = to_keep(keep);
                 std::vector<int32_t> p = to_vec(cell_pos);
                 nb::gil_scoped_release release;
                 c.keep_per_head(seq, k, p, n_ctx);
             },
             "seq"_a, "keep"_a, "cell_pos"_a, "n_ctx"_a = 0,
             "Per-(layer, KV head) eviction: keep[l, h] lists the positions layer l, KV head h keeps (one length "
             "C for all); the C cells get positions cell_pos; the context is resized to n_ctx (0: as it is).")
        .def("state_get_kept",
             [](const psg_context & c, int32_t seq, const i32_array & positions) {
                 std::vector<int32_t> p = to_vec(positions);
                 std::vector<uint8_t> out;
                 {
                     nb::gil_scoped_release release;
                     out = c.state_get_kept(seq, p);
                 }
                 return to_bytes(out);
             },
             "seq"_a, "positions"_a,
             "The state of `seq` restricted to the cells at `positions`, as seq_keep_positions then state_get "
             "give it, read whole and cut on the host (one read per row on a device backend).")
        .def_prop_ro("kv_bytes_per_cell", &psg_context::kv_bytes_per_cell)
        .def("kv_bytes", &psg_context::kv_bytes, "seq"_a = 0)
        .def_prop_ro("kv_bytes_allocated", &psg_context::kv_bytes_allocated)
        .def("compact", &psg_context::compact, "seq"_a = 0, "n_ctx"_a = 0, nb::call_guard<nb::gil_scoped_release>());
}

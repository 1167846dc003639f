#include "attention_graph.h"

#include "transfers.h"

#include "ggml-alloc.h"
#include "ggml-backend.h"
#include "ggml.h"

#include <algorithm>

// the graph's buffers (the scores, their softmax and its transpose, three
// of a size) stay under this many bytes: KV groups are scored in chunks
static const int64_t k_chunk_bytes = 192ll << 20;

static ggml_backend_buffer_t buffer_of(const ggml_tensor * t) {
    if (t->buffer != nullptr) {
        return t->buffer;
    }
    return t->view_src != nullptr ? t->view_src->buffer : nullptr;
}

bool psg_attention_graph::keys_off_host(const ggml_tensor * k) {
    ggml_backend_buffer_t buf = buffer_of(k);
    return buf != nullptr && !ggml_backend_buffer_is_host(buf);
}

psg_attention_graph::~psg_attention_graph() {
    for (runner & r : runners) {
        ggml_gallocr_free(r.alloc);
        ggml_backend_free(r.backend);
    }
}

psg_attention_graph::runner * psg_attention_graph::runner_for(const ggml_tensor * k, int32_t n_threads) {
    ggml_backend_buffer_t buf = buffer_of(k);
    if (buf == nullptr) {
        return nullptr;
    }
    ggml_backend_dev_t dev = ggml_backend_buft_get_device(ggml_backend_buffer_get_type(buf));
    if (dev == nullptr && ggml_backend_buffer_is_host(buf)) {
        dev = ggml_backend_dev_by_type(GGML_BACKEND_DEVICE_TYPE_CPU);  // the CPU buffer type names no device
    }
    if (dev == nullptr) {
        return nullptr;
    }
    runner * r = nullptr;
    for (runner & each : runners) {
        if (each.dev == dev) {
            r = &each;
        }
    }
    if (r == nullptr) {
        ggml_backend_t backend = ggml_backend_dev_init(dev, nullptr);
        if (backend == nullptr) {
            return nullptr;
        }
        runners.push_back({dev, backend, ggml_gallocr_new(ggml_backend_get_default_buffer_type(backend))});
        r = &runners.back();
    }
    // a CPU backend runs on the context's threads
    auto set_threads = (ggml_backend_set_n_threads_t) ggml_backend_reg_get_proc_address(
        ggml_backend_dev_backend_reg(dev), "ggml_backend_set_n_threads");
    if (set_threads != nullptr && n_threads > 0) {
        set_threads(r->backend, n_threads);
    }
    return r;
}

// A leaf of the graph over memory another graph owns: the region of `t` at
// `offset` with t's strides and the shape `ne`. A view would link the graph
// to t's sources, and so to the whole model graph before it.
static ggml_tensor * alias(ggml_context * ctx, const ggml_tensor * t, int64_t ne0, int64_t ne1, int64_t ne2,
                           size_t offset) {
    ggml_tensor * a = ggml_new_tensor_3d(ctx, t->type, ne0, ne1, ne2);
    for (int i = 0; i < GGML_MAX_DIMS; ++i) {
        a->nb[i] = t->nb[i];
    }
    a->buffer = buffer_of(t);
    a->data = (char *) t->data + offset;
    return a;
}

bool psg_attention_graph::score(const psg_attention_inputs & in, int32_t n_threads, std::vector<float> & out,
                                std::string & why) {
    const ggml_tensor * q = in.q;
    const ggml_tensor * k = in.k;
    const ggml_tensor * mask = in.mask;
    runner * r = runner_for(k, n_threads);
    if (r == nullptr) {
        why = "no backend for the buffer that holds the keys";
        return false;
    }
    const int64_t hd = q->ne[0], n_head = q->ne[2], n_head_kv = k->ne[2];
    const int64_t group = n_head / n_head_kv;
    const int64_t n_cells = in.n_cells, n_rows = in.n_rows;
    const bool weighted = std::any_of(in.weights, in.weights + n_rows, [](float w) { return w != 1.0f; });
    const int64_t per_group = std::max<int64_t>(1, 3 * n_cells * n_rows * group * (int64_t) sizeof(float));
    const int64_t chunk = std::clamp<int64_t>(k_chunk_bytes / per_group, 1, n_head_kv);
    out.assign((size_t) (n_head_kv * n_cells), 0.0f);
    meta.resize(ggml_tensor_overhead() * 32 + ggml_graph_overhead_custom(32, false));

    for (int64_t g0 = 0; g0 < n_head_kv; g0 += chunk) {
        const int64_t ng = std::min(chunk, n_head_kv - g0);
        ggml_init_params ip = {meta.size(), meta.data(), /*no_alloc =*/ true};
        ggml_context * ctx = ggml_init(ip);
        auto fail = [&](const std::string & reason) {
            why = reason;
            ggml_free(ctx);
            return false;
        };
        ggml_tensor * qs = alias(ctx, q, hd, n_rows, ng * group, (size_t) in.row0 * q->nb[1] + (size_t) (g0 * group) * q->nb[2]);
        ggml_tensor * ks = alias(ctx, k, hd, n_cells, ng, (size_t) g0 * k->nb[2]);
        ggml_tensor * ms = alias(ctx, mask, n_cells, n_rows, 1, (size_t) in.row0 * mask->nb[1]);
        if (!ggml_is_contiguous(ms)) {
            ms = ggml_cont(ctx, ms);
        }
        // [n_cells, n_rows, heads]: query head h against KV head h / group, as llama.cpp's attention does
        ggml_tensor * kq = ggml_mul_mat(ctx, ks, qs);
        ggml_mul_mat_set_prec(kq, GGML_PREC_F32);
        float scale = in.scale;
        if (in.softcap != 0.0f) {
            kq = ggml_scale(ctx, ggml_tanh(ctx, ggml_scale(ctx, kq, in.scale / in.softcap)), in.softcap);
            scale = 1.0f;
        }
        ggml_tensor * p = ggml_soft_max_ext(ctx, kq, ms, scale, 0.0f);
        ggml_tensor * w = nullptr;
        if (weighted) {
            w = ggml_new_tensor_3d(ctx, GGML_TYPE_F32, 1, n_rows, 1);
            ggml_set_input(w);
            p = ggml_mul(ctx, p, w);
        }
        // the rows and a group's heads side by side in dim 0, then reduced there
        p = ggml_reshape_4d(ctx, p, n_cells, n_rows, group, ng);
        p = ggml_cont(ctx, ggml_permute(ctx, p, 2, 0, 1, 3));
        p = ggml_reshape_3d(ctx, p, n_rows * group, n_cells, ng);
        const int window = (int) (n_rows * group);
        ggml_tensor * reduced = in.reduce_max ? ggml_pool_2d(ctx, p, GGML_OP_POOL_MAX, window, 1, window, 1, 0, 0)
                                              : ggml_sum_rows(ctx, p);
        ggml_set_output(reduced);
        ggml_cgraph * gf = ggml_new_graph_custom(ctx, 32, false);
        ggml_build_forward_expand(gf, reduced);
        for (int i = 0; i < ggml_graph_n_nodes(gf); ++i) {
            ggml_tensor * node = ggml_graph_node(gf, i);
            if (!ggml_backend_supports_op(r->backend, node)) {
                return fail(std::string(ggml_backend_name(r->backend)) + " cannot run " + ggml_op_desc(node));
            }
        }
        if (!ggml_gallocr_alloc_graph(r->alloc, gf)) {
            return fail("the scoring graph's buffer could not be allocated");
        }
        if (w != nullptr) {
            ggml_backend_tensor_set(w, in.weights, 0, (size_t) n_rows * sizeof(float));
            psg_count_transfer(PSG_CAPTURE_WRITE, (size_t) n_rows * sizeof(float));
        }
        if (ggml_backend_graph_compute(r->backend, gf) != GGML_STATUS_SUCCESS) {
            return fail("the scoring graph failed on " + std::string(ggml_backend_name(r->backend)));
        }
        // [1, n_cells, ng]: group after group
        const size_t n_out = (size_t) (n_cells * ng) * sizeof(float);
        ggml_backend_tensor_get(reduced, out.data() + g0 * n_cells, 0, n_out);
        psg_count_transfer(PSG_CAPTURE_READ, n_out);
        ggml_free(ctx);
    }
    return true;
}

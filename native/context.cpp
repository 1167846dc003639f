#include "context.h"

#include <algorithm>
#include <cmath>
#include <stdexcept>
#include <thread>

using std::invalid_argument;
using std::runtime_error;
using std::string;
using std::to_string;
using std::vector;

static enum llama_flash_attn_type parse_flash_attn(const string & s) {
    if (s == "off") return LLAMA_FLASH_ATTN_TYPE_DISABLED;
    if (s == "on") return LLAMA_FLASH_ATTN_TYPE_ENABLED;
    if (s == "auto") return LLAMA_FLASH_ATTN_TYPE_AUTO;
    throw invalid_argument("flash_attn must be 'off', 'on' or 'auto', not '" + s + "'");
}

// The cache types llama.cpp accepts for K and V (common/arg.cpp's list).
ggml_type psg_cache_type_parse(const string & s, const char * which) {
    static const ggml_type allowed[] = {GGML_TYPE_F32,  GGML_TYPE_F16,  GGML_TYPE_BF16, GGML_TYPE_Q8_0, GGML_TYPE_Q4_0,
                                        GGML_TYPE_Q4_1, GGML_TYPE_Q5_0, GGML_TYPE_Q5_1, GGML_TYPE_IQ4_NL};
    string names;
    for (ggml_type t : allowed) {
        if (s == ggml_type_name(t)) {
            return t;
        }
        names += (names.empty() ? "" : ", ") + string(ggml_type_name(t));
    }
    throw invalid_argument(string(which) + " must be one of " + names + ", not '" + s + "'");
}

psg_context::psg_context(psg_model * model, const psg_context_params & p) : owner(model), params(p) {
    owner->check_open();
    parse_flash_attn(params.flash_attn);
    psg_cache_type_parse(params.type_k, "type_k");
    if (ggml_blck_size(psg_cache_type_parse(params.type_v, "type_v")) != 1 && params.flash_attn == "off") {
        throw invalid_argument("a quantized V cache (type_v='" + params.type_v + "') needs flash_attn='on'");
    }
    if (params.n_batch < 1 || params.n_ubatch < 1) {
        throw invalid_argument("n_batch and n_ubatch must be positive");
    }
    if (params.n_ubatch > params.n_batch) {
        params.n_ubatch = params.n_batch;
    }
    if (params.n_seq_max < 1 || params.n_seq_max > 64) {
        throw invalid_argument("n_seq_max must be in [1, 64]");
    }
    // llama.cpp asserts (and aborts) when it reserves outputs for more sequences than a batch holds
    if (params.n_batch < (uint32_t) params.n_seq_max) {
        throw invalid_argument("n_batch must be at least n_seq_max (" + to_string(params.n_seq_max) + "), not " +
                               to_string(params.n_batch));
    }
    capture = std::make_unique<psg_capture>();
    capture->n_layer = owner->n_layer();
    capture->n_head = owner->n_head();
    capture->n_head_kv = owner->n_head_kv();
    capture->n_threads = params.n_threads > 0 ? params.n_threads
                                              : (int32_t) std::max(1u, std::thread::hardware_concurrency());
    ctx = create(params.n_ctx);
    owner->n_open_contexts++;
    // llama.cpp may round n_ctx up and cap the batch sizes to it
    params.n_ctx = llama_n_ctx(ctx);
    params.n_batch = llama_n_batch(ctx);
    params.n_ubatch = llama_n_ubatch(ctx);
    sampler_set(0.0f, 1.0f, 0);
}

llama_context * psg_context::create(uint32_t n_ctx) const {
    // llama.cpp asserts (and aborts) when it reserves outputs for more sequences than the cache holds
    if (n_ctx < 8 || n_ctx < (uint32_t) params.n_seq_max) {
        throw invalid_argument("n_ctx must be at least 8 and at least n_seq_max (" + to_string(params.n_seq_max) +
                               "), not " + to_string(n_ctx));
    }
    llama_context_params cp = llama_context_default_params();
    cp.n_ctx = n_ctx;
    cp.n_batch = params.n_batch;
    cp.n_ubatch = params.n_ubatch;
    cp.n_seq_max = params.n_seq_max;
    cp.kv_unified = true; // sequences share one cell array: seq_cp copies nothing
    cp.flash_attn_type = parse_flash_attn(params.flash_attn);
    cp.type_k = psg_cache_type_parse(params.type_k, "type_k");
    cp.type_v = psg_cache_type_parse(params.type_v, "type_v");
    if (params.n_threads > 0) {
        cp.n_threads = params.n_threads;
        cp.n_threads_batch = params.n_threads;
    }
    cp.cb_eval = psg_capture_eval_cb;
    cp.cb_eval_user_data = capture.get();
    cp.no_perf = true;
    llama_context * c = llama_init_from_model(owner->model, cp);
    if (c == nullptr) {
        throw runtime_error("llama_init_from_model failed (n_ctx=" + to_string(n_ctx) +
                            "; out of memory or invalid parameters)");
    }
    return c;
}

psg_context::~psg_context() {
    try {
        close();
    } catch (...) {
    }
}

void psg_context::close() {
    sampler.free();
    if (ctx != nullptr) {
        llama_free(ctx);
        ctx = nullptr;
        owner->n_open_contexts--;
    }
}

void psg_context::check_open() const {
    if (ctx == nullptr) {
        throw runtime_error("the context is closed");
    }
    owner->check_open();
}

void psg_context::check_seq(int32_t seq) const {
    if (seq < 0 || seq >= params.n_seq_max) {
        throw invalid_argument("sequence id " + to_string(seq) + " out of range [0, " + to_string(params.n_seq_max) + ")");
    }
}

uint32_t psg_context::n_ctx() const { check_open(); return llama_n_ctx(ctx); }

void psg_context::decode(const vector<int32_t> & tokens, int32_t pos0, int32_t seq, int32_t want,
                         vector<float> * out, int32_t next_token) {
    check_open();
    check_seq(seq);
    const int32_t n = (int32_t) tokens.size();
    if (n == 0) {
        throw invalid_argument("nothing to decode: the token list is empty");
    }
    for (int32_t t : tokens) {
        owner->check_token(t);
    }
    if (next_token >= 0) {
        owner->check_token(next_token);
    }
    const int32_t expected = pos_max(seq) + 1;
    if (pos0 != expected) {
        throw invalid_argument("decode must continue sequence " + to_string(seq) + " at position " +
                               to_string(expected) + ", not " + to_string(pos0));
    }
    const int32_t free_cells = (int32_t) llama_n_ctx(ctx) - cells.n_used();
    if (n > free_cells) {
        throw invalid_argument("the context is full: " + to_string(n) + " tokens to decode, " +
                               to_string(free_cells) + " free KV cells of " + to_string(llama_n_ctx(ctx)) +
                               " (use a larger n_ctx)");
    }
    if (capture->armed && !cells.layout_known) {
        throw runtime_error("attention capture needs a known KV layout; compact() the context after "
                            "removing positions from the middle of a sequence");
    }

    // With capture armed, each llama_decode gets one ubatch so that the
    // callback knows which rows it sees.
    const int32_t step = capture->armed ? (int32_t) params.n_ubatch : (int32_t) params.n_batch;
    const int32_t n_vocab = owner->n_vocab();
    if (want == 2) {
        out->assign(next_token >= 0 ? n : n - 1, 0.0f);
    } else if (want == 3) {
        out->assign((size_t) n * (size_t) n_vocab, 0.0f);
    }
    llama_batch batch = llama_batch_init(step, 0, 1);
    try {
        for (int32_t start = 0; start < n; start += step) {
            const int32_t m = std::min(step, n - start);
            batch.n_tokens = m;
            for (int32_t i = 0; i < m; ++i) {
                batch.token[i] = tokens[start + i];
                batch.pos[i] = pos0 + start + i;
                batch.n_seq_id[i] = 1;
                batch.seq_id[i][0] = seq;
                const bool last = start + i == n - 1;
                batch.logits[i] = (want >= 2) || (want == 1 && last);
            }
            // the new tokens' cells are appended before the graph runs
            const size_t n_before = cells.pos.size();
            cells.append(batch.pos, m, seq);
            capture->set_ubatch(cells, batch.pos, m);
            const int32_t rc = llama_decode(ctx, batch);
            if (rc != 0) {
                cells.truncate(n_before);
                capture->ubatch_discard();
                throw runtime_error("llama_decode failed with code " + to_string(rc) +
                                    (rc == 1 ? " (no KV slot for the batch)" : ""));
            }
            capture->ubatch_finish();
            if (want == 2) {
                for (int32_t i = 0; i < m; ++i) {
                    const int32_t gi = start + i;
                    const int32_t target = gi + 1 < n ? tokens[gi + 1] : next_token;
                    if (target < 0) {
                        break;
                    }
                    const float * lg = llama_get_logits_ith(ctx, i);
                    float mx = lg[0];
                    for (int32_t v = 1; v < n_vocab; ++v) mx = std::max(mx, lg[v]);
                    double z = 0.0;
                    for (int32_t v = 0; v < n_vocab; ++v) z += std::exp((double) (lg[v] - mx));
                    (*out)[gi] = (float) ((double) (lg[target] - mx) - std::log(z));
                }
            } else if (want == 3) {
                for (int32_t i = 0; i < m; ++i) {
                    const float * lg = llama_get_logits_ith(ctx, i);
                    std::copy(lg, lg + n_vocab, out->begin() + (size_t) (start + i) * (size_t) n_vocab);
                }
            }
            if (want >= 1 && start + m == n) {
                last_logits_index = m - 1;
            }
        }
    } catch (...) {
        llama_batch_free(batch);
        throw;
    }
    llama_batch_free(batch);
    if (want == 0) {
        last_logits_index = -1;
    }
}

vector<float> psg_context::logits_last() const {
    check_open();
    if (last_logits_index < 0) {
        throw runtime_error("no logits: the last decode did not ask for them");
    }
    const float * lg = llama_get_logits_ith(ctx, last_logits_index);
    return vector<float>(lg, lg + owner->n_vocab());
}

void psg_context::sampler_set(float temperature, float top_p, uint32_t seed) {
    sampler.set(temperature, top_p, seed);
}

int32_t psg_context::sample() {
    check_open();
    if (last_logits_index < 0) {
        throw runtime_error("nothing to sample from: the last decode did not ask for logits");
    }
    return sampler.sample(ctx, last_logits_index);
}

void psg_context::capture_arm(const vector<int32_t> & layers, const vector<int32_t> & positions,
                              const vector<float> & weights, int32_t reduce, int32_t scoring) {
    check_open();
    if (per_head) {
        throw invalid_argument("attention capture cannot map columns to positions once the KV cache holds "
                               "per-head sets");
    }
    capture->arm(layers, positions, weights, (psg_reduce) reduce, (psg_scoring) scoring);
}

void psg_context::capture_disarm() {
    capture->disarm();
}

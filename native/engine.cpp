#include "engine.h"
#include "heads.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <stdexcept>

using std::invalid_argument;
using std::runtime_error;
using std::string;
using std::to_string;
using std::vector;

void psg_backend_init() {
    static bool done = false;
    if (!done) {
        llama_backend_init();
        done = true;
    }
}

// ---------------------------------------------------------------- model

psg_model::psg_model(const string & path_, int32_t n_gpu_layers, bool use_mmap) : path(path_) {
    std::ifstream f(path, std::ios::binary);
    if (!f) {
        throw invalid_argument("model file not found or unreadable: " + path);
    }
    char magic[4] = {0, 0, 0, 0};
    f.read(magic, 4);
    if (f.gcount() != 4 || memcmp(magic, "GGUF", 4) != 0) {
        throw invalid_argument("not a GGUF file (bad magic): " + path);
    }
    f.close();

    psg_backend_init();
    llama_model_params mp = llama_model_default_params();
    mp.n_gpu_layers = n_gpu_layers;
    if (!use_mmap) {
        mp.load_mode = LLAMA_LOAD_MODE_NONE;
    }
    model = llama_model_load_from_file(path.c_str(), mp);
    if (model == nullptr) {
        throw runtime_error("llama_model_load_from_file failed for " + path +
                            " (unsupported architecture or corrupt file; enable logging for details)");
    }
    vocab = llama_model_get_vocab(model);
}

psg_model::~psg_model() {
    if (model != nullptr && n_open_contexts == 0) {
        llama_model_free(model);
    }
    model = nullptr;
}

void psg_model::close() {
    if (model == nullptr) {
        return;
    }
    if (n_open_contexts > 0) {
        throw runtime_error("cannot close the model: " + to_string(n_open_contexts) +
                            " context(s) still open; close them first");
    }
    llama_model_free(model);
    model = nullptr;
    vocab = nullptr;
}

void psg_model::check_open() const {
    if (model == nullptr) {
        throw runtime_error("the model is closed");
    }
}

int32_t psg_model::n_layer() const { check_open(); return llama_model_n_layer(model); }
int32_t psg_model::n_head() const { check_open(); return llama_model_n_head(model); }
int32_t psg_model::n_head_kv() const { check_open(); return llama_model_n_head_kv(model); }
int32_t psg_model::n_vocab() const { check_open(); return llama_vocab_n_tokens(vocab); }
int32_t psg_model::n_ctx_train() const { check_open(); return llama_model_n_ctx_train(model); }

string psg_model::meta(const string & key) const {
    check_open();
    vector<char> buf(256);
    int32_t n = llama_model_meta_val_str(model, key.c_str(), buf.data(), buf.size());
    if (n < 0) {
        return "";
    }
    if ((size_t) n >= buf.size()) {
        buf.resize(n + 1);
        llama_model_meta_val_str(model, key.c_str(), buf.data(), buf.size());
    }
    return string(buf.data(), n);
}

int64_t psg_model::kv_bytes_per_cell() const {
    check_open();
    const string arch = meta("general.architecture");
    const int64_t n_embd = llama_model_n_embd(model);
    const int64_t head = n_head();
    string k = meta(arch + ".attention.key_length");
    string v = meta(arch + ".attention.value_length");
    const int64_t k_dim = k.empty() ? n_embd / head : std::stoll(k);
    const int64_t v_dim = v.empty() ? n_embd / head : std::stoll(v);
    return (int64_t) n_layer() * n_head_kv() * (k_dim + v_dim) * (int64_t) sizeof(uint16_t);
}

void psg_model::check_token(int32_t token) const {
    if (token < 0 || token >= n_vocab()) {
        throw invalid_argument("token id " + to_string(token) + " out of range [0, " + to_string(n_vocab()) + ")");
    }
}

vector<int32_t> psg_model::tokenize(const string & text, bool add_special, bool parse_special) const {
    check_open();
    vector<int32_t> out(text.size() + 8);
    int32_t n = llama_tokenize(vocab, text.data(), (int32_t) text.size(), out.data(), (int32_t) out.size(),
                               add_special, parse_special);
    if (n < 0) {
        out.resize(-n);
        n = llama_tokenize(vocab, text.data(), (int32_t) text.size(), out.data(), (int32_t) out.size(),
                           add_special, parse_special);
    }
    if (n < 0) {
        throw runtime_error("llama_tokenize failed (" + to_string(n) + ")");
    }
    out.resize(n);
    return out;
}

string psg_model::detokenize(const vector<int32_t> & tokens, bool special) const {
    check_open();
    for (int32_t t : tokens) {
        check_token(t);
    }
    string out(tokens.size() * 8 + 16, '\0');
    int32_t n = llama_detokenize(vocab, tokens.data(), (int32_t) tokens.size(), out.data(), (int32_t) out.size(),
                                 false, special);
    if (n < 0) {
        out.resize(-n);
        n = llama_detokenize(vocab, tokens.data(), (int32_t) tokens.size(), out.data(), (int32_t) out.size(),
                             false, special);
    }
    if (n < 0) {
        throw runtime_error("llama_detokenize failed (" + to_string(n) + ")");
    }
    out.resize(n);
    return out;
}

string psg_model::token_bytes(int32_t token, bool special) const {
    check_open();
    check_token(token);
    char buf[256];
    int32_t n = llama_token_to_piece(vocab, token, buf, sizeof(buf), 0, special);
    if (n < 0) {
        string big(-n, '\0');
        n = llama_token_to_piece(vocab, token, big.data(), (int32_t) big.size(), 0, special);
        big.resize(std::max(n, 0));
        return big;
    }
    return string(buf, n);
}

bool psg_model::is_eog(int32_t token) const {
    check_open();
    check_token(token);
    return llama_vocab_is_eog(vocab, token);
}

bool psg_model::is_control(int32_t token) const {
    check_open();
    check_token(token);
    return llama_vocab_is_control(vocab, token);
}

string psg_model::chat_template(const vector<string> & roles, const vector<string> & contents,
                                bool add_assistant) const {
    check_open();
    if (roles.size() != contents.size()) {
        throw invalid_argument("roles and contents differ in length");
    }
    const char * tmpl = llama_model_chat_template(model, nullptr);
    if (tmpl == nullptr) {
        throw invalid_argument("the model has no chat template; pass a plain prompt instead of messages");
    }
    vector<llama_chat_message> msgs(roles.size());
    size_t total = 0;
    for (size_t i = 0; i < roles.size(); ++i) {
        msgs[i] = {roles[i].c_str(), contents[i].c_str()};
        total += roles[i].size() + contents[i].size();
    }
    vector<char> buf(2 * total + 256);
    int32_t n = llama_chat_apply_template(tmpl, msgs.data(), msgs.size(), add_assistant, buf.data(), (int32_t) buf.size());
    if (n > (int32_t) buf.size()) {
        buf.resize(n);
        n = llama_chat_apply_template(tmpl, msgs.data(), msgs.size(), add_assistant, buf.data(), (int32_t) buf.size());
    }
    if (n < 0) {
        throw invalid_argument("the model's chat template is not one llama.cpp supports natively");
    }
    return string(buf.data(), n);
}

uint64_t psg_model::vocab_fingerprint() const {
    // FNV-1a over every token's text and attributes, plus the special ids.
    check_open();
    uint64_t h = 1469598103934665603ull;
    auto mix = [&h](const void * p, size_t n) {
        const uint8_t * b = static_cast<const uint8_t *>(p);
        for (size_t i = 0; i < n; ++i) {
            h = (h ^ b[i]) * 1099511628211ull;
        }
    };
    const int32_t n = n_vocab();
    mix(&n, sizeof(n));
    for (int32_t t = 0; t < n; ++t) {
        const char * text = llama_vocab_get_text(vocab, t);
        mix(text, strlen(text) + 1);
        const int32_t attr = llama_vocab_get_attr(vocab, t);
        mix(&attr, sizeof(attr));
    }
    const int32_t specials[] = {llama_vocab_bos(vocab), llama_vocab_eos(vocab), llama_vocab_eot(vocab)};
    mix(specials, sizeof(specials));
    return h;
}

// ---------------------------------------------------------------- context

static enum llama_flash_attn_type parse_flash_attn(const string & s) {
    if (s == "off") return LLAMA_FLASH_ATTN_TYPE_DISABLED;
    if (s == "on") return LLAMA_FLASH_ATTN_TYPE_ENABLED;
    if (s == "auto") return LLAMA_FLASH_ATTN_TYPE_AUTO;
    throw invalid_argument("flash_attn must be 'off', 'on' or 'auto', not '" + s + "'");
}

// The cache types llama.cpp accepts for K and V (common/arg.cpp's list).
static ggml_type parse_cache_type(const string & s, const char * which) {
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
    parse_cache_type(params.type_k, "type_k");
    if (ggml_blck_size(parse_cache_type(params.type_v, "type_v")) != 1 && params.flash_attn == "off") {
        throw invalid_argument("a quantized V cache (type_v='" + params.type_v + "') needs flash_attn='on'");
    }
    if (params.n_ctx < 8) {
        throw invalid_argument("n_ctx must be at least 8");
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
    capture = std::make_unique<psg_capture>();
    capture->n_layer = owner->n_layer();
    capture->n_head = owner->n_head();
    capture->n_head_kv = owner->n_head_kv();
    ctx = create(params.n_ctx);
    owner->n_open_contexts++;
    // llama.cpp may round n_ctx up and cap the batch sizes to it
    params.n_ctx = llama_n_ctx(ctx);
    params.n_batch = llama_n_batch(ctx);
    params.n_ubatch = llama_n_ubatch(ctx);
    sampler_set(0.0f, 1.0f, 0);
}

llama_context * psg_context::create(uint32_t n_ctx) const {
    llama_context_params cp = llama_context_default_params();
    cp.n_ctx = n_ctx;
    cp.n_batch = params.n_batch;
    cp.n_ubatch = params.n_ubatch;
    cp.n_seq_max = params.n_seq_max;
    cp.kv_unified = true; // sequences share one cell array: seq_cp copies nothing
    cp.flash_attn_type = parse_flash_attn(params.flash_attn);
    cp.type_k = parse_cache_type(params.type_k, "type_k");
    cp.type_v = parse_cache_type(params.type_v, "type_v");
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
    if (sampler != nullptr) {
        llama_sampler_free(sampler);
        sampler = nullptr;
    }
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

int32_t psg_context::n_cells_used() const {
    int32_t n = 0;
    for (int32_t p : cell_pos) {
        n += p >= 0;
    }
    return n;
}

int32_t psg_context::n_cells(int32_t seq) const {
    check_open();
    check_seq(seq);
    int32_t n = 0;
    for (uint64_t m : cell_seqs) {
        n += (m >> seq) & 1;
    }
    return n;
}

// ---------------------------------------------------------------- KV mirror

bool psg_context::mirror_has_holes() const {
    return std::find(cell_pos.begin(), cell_pos.end(), -1) != cell_pos.end();
}

void psg_context::mirror_append(const int32_t * pos, int32_t n, int32_t seq) {
    if (mirror_has_holes()) {
        layout_known = false; // llama.cpp may have put these tokens into the holes
    }
    for (int32_t i = 0; i < n; ++i) {
        cell_pos.push_back(pos[i]);
        cell_seqs.push_back(1ull << seq);
    }
}

void psg_context::mirror_remove(int32_t seq, int32_t p0, int32_t p1) {
    if (p0 < 0) p0 = 0;
    if (p1 < 0) p1 = INT32_MAX;
    for (size_t c = 0; c < cell_pos.size(); ++c) {
        if (cell_pos[c] >= p0 && cell_pos[c] < p1 && ((cell_seqs[c] >> seq) & 1)) {
            cell_seqs[c] &= ~(1ull << seq);
            if (cell_seqs[c] == 0) {
                cell_pos[c] = -1;
            }
        }
    }
    while (!cell_pos.empty() && cell_pos.back() == -1) {
        cell_pos.pop_back();
        cell_seqs.pop_back();
    }
}

// Rebuilds the mirror from a single-sequence state blob just loaded into an
// empty cache: llama.cpp places its cells contiguously from cell 0, in order.
void psg_context::mirror_from_blob(const vector<uint8_t> & blob) {
    size_t off = 0;
    auto rd = [&](void * dst, size_t n) {
        if (off + n > blob.size()) {
            throw runtime_error("KV state blob is truncated");
        }
        memcpy(dst, blob.data() + off, n);
        off += n;
    };
    uint32_t magic, n_stream, n_cell_total = 0;
    int32_t seq;
    rd(&magic, 4);
    rd(&seq, 4);
    rd(&n_stream, 4);
    if (n_stream != 1) {
        throw runtime_error("KV state blob has " + to_string(n_stream) + " streams; one is supported");
    }
    rd(&n_cell_total, 4);
    cell_pos.clear();
    cell_seqs.clear();
    for (uint32_t i = 0; i < n_cell_total; ++i) {
        int32_t pos;
        uint32_t n_seq_id;
        rd(&pos, 4);
        rd(&n_seq_id, 4);
        if (n_seq_id != 1) {
            throw runtime_error("KV state blob has a cell shared by several sequences");
        }
        int32_t s;
        rd(&s, 4);
        cell_pos.push_back(pos);
        cell_seqs.push_back(1ull << s);
    }
    layout_known = true;
}

// ---------------------------------------------------------------- decode

void psg_context::decode(const vector<int32_t> & tokens, int32_t pos0, int32_t seq, int32_t want,
                         vector<float> * logprobs, int32_t next_token) {
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
    const int32_t free_cells = (int32_t) llama_n_ctx(ctx) - n_cells_used();
    if (n > free_cells) {
        throw invalid_argument("the context is full: " + to_string(n) + " tokens to decode, " +
                               to_string(free_cells) + " free KV cells of " + to_string(llama_n_ctx(ctx)) +
                               " (use a larger n_ctx)");
    }
    if (capture->armed && !layout_known) {
        throw runtime_error("attention capture needs a known KV layout; compact() the context after "
                            "removing positions from the middle of a sequence");
    }

    // With capture armed, each llama_decode gets one ubatch so that the
    // callback knows which rows it sees.
    const int32_t step = capture->armed ? (int32_t) params.n_ubatch : (int32_t) params.n_batch;
    const int32_t n_vocab = owner->n_vocab();
    if (logprobs != nullptr) {
        logprobs->assign(next_token >= 0 ? n : n - 1, 0.0f);
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
                batch.logits[i] = (want == 2) || (want == 1 && last);
            }
            capture->cell_pos = &cell_pos;
            // the new tokens' cells are appended before the graph runs
            const size_t n_before = cell_pos.size();
            mirror_append(batch.pos, m, seq);
            capture->set_ubatch(batch.pos, m);
            const int64_t seen_before = capture->n_tensors_seen;
            const int32_t rc = llama_decode(ctx, batch);
            if (rc != 0) {
                cell_pos.resize(n_before);
                cell_seqs.resize(n_before);
                capture->ubatch_rows.clear();
                throw runtime_error("llama_decode failed with code " + to_string(rc) +
                                    (rc == 1 ? " (no KV slot for the batch)" : ""));
            }
            if (!capture->ubatch_rows.empty()) {
                const int64_t expect = (int64_t) capture->layers.size();
                if (capture->n_tensors_seen - seen_before != expect) {
                    const string err = capture->error;
                    capture->ubatch_rows.clear();
                    throw runtime_error("attention capture saw " + to_string(capture->n_tensors_seen - seen_before) +
                                        " of " + to_string(expect) + " attention tensors" +
                                        (err.empty() ? " (is flash attention off?)" : ": " + err));
                }
            }
            capture->ubatch_rows.clear();
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
                    (*logprobs)[gi] = (float) ((double) (lg[target] - mx) - std::log(z));
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
    if (!(top_p > 0.0f && top_p <= 1.0f)) {
        throw invalid_argument("top_p must be in (0, 1]");
    }
    if (!(temperature >= 0.0f)) {
        throw invalid_argument("temperature must be >= 0");
    }
    if (sampler != nullptr) {
        llama_sampler_free(sampler);
    }
    sampler = llama_sampler_chain_init(llama_sampler_chain_default_params());
    if (temperature == 0.0f) {
        llama_sampler_chain_add(sampler, llama_sampler_init_greedy());
    } else {
        if (top_p < 1.0f) {
            llama_sampler_chain_add(sampler, llama_sampler_init_top_p(top_p, 1));
        }
        llama_sampler_chain_add(sampler, llama_sampler_init_temp(temperature));
        llama_sampler_chain_add(sampler, llama_sampler_init_dist(seed));
    }
}

int32_t psg_context::sample() {
    check_open();
    if (last_logits_index < 0) {
        throw runtime_error("nothing to sample from: the last decode did not ask for logits");
    }
    return llama_sampler_sample(sampler, ctx, last_logits_index);
}

// ---------------------------------------------------------------- capture

void psg_context::capture_arm(const vector<int32_t> & layers, const vector<int32_t> & positions,
                              const vector<float> & weights, int32_t reduce) {
    check_open();
    if (params.flash_attn != "off") {
        throw invalid_argument("attention capture needs a context created with flash_attn='off' "
                               "(with flash attention llama.cpp computes no softmax tensor)");
    }
    if (per_head) {
        throw invalid_argument("attention capture cannot map columns to positions once the KV cache holds "
                               "per-head sets");
    }
    if (layers.empty()) {
        throw invalid_argument("capture needs at least one layer");
    }
    const int32_t n_layer = owner->n_layer();
    vector<int32_t> seen(n_layer, 0);
    for (int32_t l : layers) {
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
    if (reduce != PSG_REDUCE_MAX && reduce != PSG_REDUCE_SUM) {
        throw invalid_argument("reduce must be 'max' or 'sum'");
    }
    capture->arm(layers, positions, weights, (psg_reduce) reduce);
}

void psg_context::capture_disarm() {
    capture->disarm();
}

// ---------------------------------------------------------------- KV ops

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
    mirror_remove(seq, p0, p1);
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
    if (p0 < 0) p0 = 0;
    if (p1 < 0) p1 = INT32_MAX;
    for (size_t c = 0; c < cell_pos.size(); ++c) {
        if (cell_pos[c] >= p0 && cell_pos[c] < p1 && ((cell_seqs[c] >> src) & 1)) {
            cell_seqs[c] |= 1ull << dst;
        }
    }
}

void psg_context::clear() {
    check_open();
    per_head = false;
    llama_memory_clear(llama_get_memory(ctx), true);
    cell_pos.clear();
    cell_seqs.clear();
    layout_known = true;
    last_logits_index = -1;
}

vector<uint8_t> psg_context::state_get(int32_t seq) const {
    check_open();
    check_seq(seq);
    const size_t size = llama_state_seq_get_size(ctx, seq);
    vector<uint8_t> blob(size);
    const size_t n = llama_state_seq_get_data(ctx, blob.data(), blob.size(), seq);
    if (n == 0 || n > size) {
        throw runtime_error("llama_state_seq_get_data failed for sequence " + to_string(seq));
    }
    blob.resize(n);
    return blob;
}

void psg_context::state_set(int32_t seq, const vector<uint8_t> & blob) {
    check_open();
    check_seq(seq);
    if (pos_max(seq) >= 0) {
        throw invalid_argument("state_set needs an empty sequence " + to_string(seq));
    }
    if (n_cells_used() > 0) {
        throw invalid_argument("state_set needs an empty context (other sequences hold cells)");
    }
    if (blob.size() < 16) {
        throw invalid_argument("KV state blob is too short");
    }
    // parse first so a malformed blob is refused before llama.cpp reads it
    vector<int32_t> old_pos = cell_pos;
    vector<uint64_t> old_seqs = cell_seqs;
    mirror_from_blob(blob);
    if ((uint32_t) cell_pos.size() > llama_n_ctx(ctx)) {
        cell_pos = old_pos;
        cell_seqs = old_seqs;
        throw invalid_argument("KV state holds " + to_string(cell_pos.size()) + " cells, more than n_ctx");
    }
    const size_t n = llama_state_seq_set_data(ctx, blob.data(), blob.size(), seq);
    if (n == 0) {
        llama_memory_clear(llama_get_memory(ctx), true);
        cell_pos.clear();
        cell_seqs.clear();
        layout_known = true;
        throw runtime_error("llama_state_seq_set_data refused the KV state (format or size mismatch)");
    }
    // the blob names its own sequence id; cells now belong to `seq`
    for (auto & m : cell_seqs) {
        m = 1ull << seq;
    }
    last_logits_index = -1;
}

int64_t psg_context::kv_bytes_per_cell() const {
    check_open();
    // the model's figure is for f16 K and V, two bytes a value
    const int64_t f16 = owner->kv_bytes_per_cell();
    const int64_t values = f16 / 2 / 2 / owner->n_layer(); // K (= V) values of one layer
    const ggml_type tk = parse_cache_type(params.type_k, "type_k"), tv = parse_cache_type(params.type_v, "type_v");
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

void psg_context::compact(int32_t seq, uint32_t n_ctx_new) {
    check_open();
    check_seq(seq);
    for (uint64_t m : cell_seqs) {
        if (m != 0 && m != (1ull << seq)) {
            throw invalid_argument("compact needs a context that holds only sequence " + to_string(seq));
        }
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
        cell_pos.clear();
        cell_seqs.clear();
        layout_known = true;
        last_logits_index = -1;
    } else {
        clear();
    }
    per_head = false;
    state_set(seq, blob);
}

vector<uint8_t> psg_context::state_rewrite(const vector<uint8_t> & blob, const vector<int32_t> & keep,
                                           int32_t n_keep, const vector<int32_t> & cell_pos, int32_t seq) const {
    check_open();
    check_seq(seq);
    const llama_model * m = owner->model;
    if (llama_model_is_recurrent(m) || llama_model_is_hybrid(m)) {
        throw invalid_argument("per-head KV eviction needs a plain attention KV cache; this model is recurrent or "
                               "hybrid");
    }
    if (llama_model_n_swa(m) > 0) {
        throw invalid_argument("per-head KV eviction does not support sliding-window attention models");
    }
    const llama_rope_type rope = llama_model_rope_type(m);
    if (rope == LLAMA_ROPE_TYPE_MROPE || rope == LLAMA_ROPE_TYPE_IMROPE || rope == LLAMA_ROPE_TYPE_VISION) {
        throw invalid_argument("per-head KV eviction does not support M-RoPE models (their cells carry 2D positions)");
    }
    psg_state_shape shape;
    shape.n_layer = owner->n_layer();
    shape.n_head_kv = owner->n_head_kv();
    return psg_rewrite_state(blob, shape, keep, n_keep, cell_pos, seq);
}

void psg_context::keep_per_head(int32_t seq, const vector<int32_t> & keep, int32_t n_keep,
                                const vector<int32_t> & cell_pos, uint32_t n_ctx_new) {
    check_open();
    check_seq(seq);
    for (uint64_t m : cell_seqs) {
        if (m != 0 && m != (1ull << seq)) {
            throw invalid_argument("keep_per_head needs a context that holds only sequence " + to_string(seq));
        }
    }
    if (n_ctx_new != 0 && (int64_t) n_ctx_new < (int64_t) n_keep + 1) {
        throw invalid_argument("n_ctx " + to_string(n_ctx_new) + " is too small for the " + to_string(n_keep) +
                               " kept cells plus one new token");
    }
    vector<uint8_t> blob = state_rewrite(state_get(seq), keep, n_keep, cell_pos, seq);
    load_state(seq, blob, n_ctx_new);
    per_head = true;
}

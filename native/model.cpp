#include "model.h"

#include <algorithm>
#include <cstring>
#include <fstream>
#include <stdexcept>

using std::invalid_argument;
using std::runtime_error;
using std::string;
using std::to_string;
using std::vector;

static void psg_backend_init() {
    static bool done = false;
    if (!done) {
        llama_backend_init();
        done = true;
    }
}

// Whether the CPU backend would place weights in llama.cpp's AMX buffer.
// Its matrix kernels crash on some Sapphire Rapids-class machines (the tile
// configuration is built on the stack and can be optimized away; see
// llama.cpp issue 20824), so a model loaded where AMX is on offer keeps its
// weights in plain CPU buffers instead.
static bool psg_cpu_offers_amx() {
    ggml_backend_dev_t cpu = ggml_backend_dev_by_type(GGML_BACKEND_DEVICE_TYPE_CPU);
    if (cpu == nullptr) {
        return false;
    }
    auto extra_bufts = (ggml_backend_dev_get_extra_bufts_t)
        ggml_backend_reg_get_proc_address(ggml_backend_dev_backend_reg(cpu), "ggml_backend_dev_get_extra_bufts");
    if (extra_bufts == nullptr) {
        return false;
    }
    for (ggml_backend_buffer_type_t * buft = extra_bufts(cpu); buft != nullptr && *buft != nullptr; ++buft) {
        if (strcmp(ggml_backend_buft_name(*buft), "AMX") == 0) {
            return true;
        }
    }
    return false;
}

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
    // without the extra buffer types the AVX2 repacking of Q4_0 goes too:
    // slower on such a machine, but it answers
    mp.use_extra_bufts = !psg_cpu_offers_amx();
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

// llama.cpp's output-buffer convention: a call that finds `out` too small
// returns minus the size it needs; call again with that size.
template <typename Buf, typename Call>
static Buf call_sized(Buf out, const char * what, Call call) {
    int32_t n = call(out);
    if (n < 0) {
        out.resize(-n);
        n = call(out);
    }
    if (n < 0) {
        throw runtime_error(string(what) + " failed (" + to_string(n) + ")");
    }
    out.resize(n);
    return out;
}

vector<int32_t> psg_model::tokenize(const string & text, bool add_special, bool parse_special) const {
    check_open();
    return call_sized(vector<int32_t>(text.size() + 8), "llama_tokenize", [&](vector<int32_t> & out) {
        return llama_tokenize(vocab, text.data(), (int32_t) text.size(), out.data(), (int32_t) out.size(),
                              add_special, parse_special);
    });
}

string psg_model::detokenize(const vector<int32_t> & tokens, bool special) const {
    check_open();
    for (int32_t t : tokens) {
        check_token(t);
    }
    return call_sized(string(tokens.size() * 8 + 16, '\0'), "llama_detokenize", [&](string & out) {
        return llama_detokenize(vocab, tokens.data(), (int32_t) tokens.size(), out.data(), (int32_t) out.size(),
                                false, special);
    });
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
        // the template reads C strings: a NUL would silently end the message there
        if (roles[i].find('\0') != string::npos || contents[i].find('\0') != string::npos) {
            throw invalid_argument("message " + std::to_string(i) + " holds a NUL character");
        }
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

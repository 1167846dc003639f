#include "state_blob.h"

#include "ggml.h"

#include <algorithm>
#include <cstring>
#include <stdexcept>
#include <string>

using std::invalid_argument;
using std::string;
using std::to_string;
using std::vector;

namespace {

struct reader {
    const vector<uint8_t> & blob;
    size_t off = 0;

    template <typename T> T get(const char * what) {
        if (off + sizeof(T) > blob.size()) {
            throw invalid_argument(string("KV state blob is truncated (reading ") + what + ")");
        }
        T v;
        memcpy(&v, blob.data() + off, sizeof(T));
        off += sizeof(T);
        return v;
    }

    size_t skip(uint64_t n, const char * what) {
        if (n > blob.size() - off) {
            throw invalid_argument(string("KV state blob is truncated (") + what + ")");
        }
        const size_t at = off;
        off += n;
        return at;
    }
};

void check_type(int32_t type, const char * what, int32_t il) {
    const string where = string(what) + " of layer " + to_string(il);
    if (type < 0 || type >= GGML_TYPE_COUNT || ggml_blck_size((ggml_type) type) <= 0 ||
        ggml_type_size((ggml_type) type) == 0) {
        throw invalid_argument("KV state: unknown tensor type " + to_string(type) + " in " + where);
    }
}

psg_state_tensor read_rows(reader & r, uint32_t n_cells, const char * what, int32_t il) {
    psg_state_tensor b;
    b.type = r.get<int32_t>(what);
    check_type(b.type, what, il);
    b.row_bytes = r.get<uint64_t>(what);
    if (b.row_bytes != 0 && n_cells > UINT64_MAX / b.row_bytes) {
        throw invalid_argument("KV state: " + string(what) + " size overflows");
    }
    b.data = r.skip(b.row_bytes * n_cells, what);
    return b;
}

psg_state_tensor read_transposed(reader & r, uint32_t n_cells, int32_t il) {
    psg_state_tensor b;
    b.type = r.get<int32_t>("V type");
    check_type(b.type, "V", il);
    b.el_bytes = r.get<uint32_t>("V element size");
    b.n_embd = r.get<uint32_t>("V rows");
    const ggml_type t = (ggml_type) b.type;
    if (ggml_blck_size(t) != 1 || b.el_bytes != ggml_type_size(t)) {
        throw invalid_argument("KV state: transposed V of layer " + to_string(il) + " has type " + ggml_type_name(t) +
                               " with element size " + to_string(b.el_bytes) + "; only unquantized types are "
                               "stored transposed");
    }
    b.data = r.skip((uint64_t) b.n_embd * n_cells * b.el_bytes, "V data");
    return b;
}

} // namespace

psg_state_blob psg_state_read_cells(const vector<uint8_t> & blob) {
    psg_state_blob st;
    reader r{blob};
    if (r.get<uint32_t>("magic") != PSG_STATE_SEQ_MAGIC) {
        throw invalid_argument("KV state blob has the wrong magic; not a sequence state of this llama.cpp build");
    }
    st.seq = r.get<int32_t>("sequence id");
    const uint32_t n_stream = r.get<uint32_t>("stream count");
    if (n_stream != 1) {
        throw invalid_argument("KV state has " + to_string(n_stream) + " streams; one is supported (a unified KV "
                               "cache)");
    }
    const uint32_t n_cells = r.get<uint32_t>("cell count");
    // each cell takes 12 bytes: do not reserve more than the blob can hold
    st.cell_pos.reserve(std::min<size_t>(n_cells, (blob.size() - r.off) / 12));
    for (uint32_t i = 0; i < n_cells; ++i) {
        const int32_t pos = r.get<int32_t>("cell position");
        const uint32_t n_seq = r.get<uint32_t>("cell sequence count");
        if (n_seq != 1) {
            throw invalid_argument("KV state: cell " + to_string(i) + " belongs to " + to_string(n_seq) +
                                   " sequences; a single-sequence state has one");
        }
        r.get<int32_t>("cell sequence id");
        st.cell_pos.push_back(pos);
    }
    st.off = r.off;
    return st;
}

void psg_state_read_layers(const vector<uint8_t> & blob, psg_state_blob & st, int32_t n_layer) {
    reader r{blob, st.off};
    const uint32_t n_cells = (uint32_t) st.cell_pos.size();
    st.v_trans = r.get<uint32_t>("v_trans");
    const uint32_t n_layer_blob = r.get<uint32_t>("layer count");
    if (st.v_trans > 1) {
        throw invalid_argument("KV state: v_trans is " + to_string(st.v_trans) + " (a different state format)");
    }
    if (n_layer_blob != (uint32_t) n_layer) {
        throw invalid_argument("KV state has " + to_string(n_layer_blob) + " layers, the model " +
                               to_string(n_layer) + " (layers without their own KV are not supported)");
    }
    st.k.resize(n_layer);
    st.v.resize(n_layer);
    for (int32_t il = 0; il < n_layer; ++il) {
        st.k[il] = read_rows(r, n_cells, "K", il);
    }
    for (int32_t il = 0; il < n_layer; ++il) {
        st.v[il] = st.v_trans ? read_transposed(r, n_cells, il) : read_rows(r, n_cells, "V", il);
    }
    if (r.off != blob.size()) {
        throw invalid_argument("KV state blob has " + to_string(blob.size() - r.off) + " unexpected trailing bytes "
                               "(a memory type or format this build does not handle)");
    }
    st.off = r.off;
}

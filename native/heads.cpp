#include "heads.h"

#include "ggml.h"

#include <cstring>
#include <stdexcept>
#include <string>
#include <unordered_map>

using std::invalid_argument;
using std::string;
using std::to_string;
using std::vector;

namespace {

// llama_context's io_magic for sequence states (src/llama-context.cpp)
constexpr uint32_t STATE_SEQ_MAGIC = 0xaf143cd8;

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

struct writer {
    vector<uint8_t> & out;
    template <typename T> void put(T v) {
        const size_t at = out.size();
        out.resize(at + sizeof(T));
        memcpy(out.data() + at, &v, sizeof(T));
    }
};

// One layer's K (or row-major V) rows, or one layer's transposed V.
struct tensor_block {
    int32_t type = 0;
    uint64_t row_bytes = 0;  // K / row-major V: bytes of one cell's row
    uint32_t el_bytes = 0;   // transposed V: bytes of one element
    uint32_t n_embd = 0;     // transposed V: rows (n_embd_v_gqa)
    size_t data = 0;         // offset of the data in the blob
};

void check_type(int32_t type, const char * what, int32_t il) {
    const string where = string(what) + " of layer " + to_string(il);
    if (type < 0 || type >= GGML_TYPE_COUNT || ggml_blck_size((ggml_type) type) <= 0 ||
        ggml_type_size((ggml_type) type) == 0) {
        throw invalid_argument("KV state: unknown tensor type " + to_string(type) + " in " + where);
    }
}

// A row of n_head_kv equal head slices, each a whole number of blocks.
uint64_t head_slice_bytes(const tensor_block & b, int32_t n_head_kv, const char * what, int32_t il) {
    const ggml_type t = (ggml_type) b.type;
    const uint64_t ts = ggml_type_size(t), bs = (uint64_t) ggml_blck_size(t);
    const uint64_t n_el = b.row_bytes / ts * bs;
    if (b.row_bytes == 0 || b.row_bytes % ts != 0 || ggml_row_size(t, (int64_t) n_el) != b.row_bytes) {
        throw invalid_argument("KV state: " + string(what) + " row of layer " + to_string(il) + " has " +
                               to_string(b.row_bytes) + " bytes, not a whole number of " + ggml_type_name(t) +
                               " blocks");
    }
    if (n_el % (uint64_t) n_head_kv != 0 || (n_el / n_head_kv) % bs != 0) {
        throw invalid_argument("KV state: " + string(what) + " of layer " + to_string(il) + " (" + to_string(n_el) +
                               " " + ggml_type_name(t) + " values) does not split into " + to_string(n_head_kv) +
                               " heads on block boundaries");
    }
    return b.row_bytes / (uint64_t) n_head_kv;
}

tensor_block read_rows(reader & r, uint32_t n_cells, const char * what, int32_t il) {
    tensor_block b;
    b.type = r.get<int32_t>(what);
    check_type(b.type, what, il);
    b.row_bytes = r.get<uint64_t>(what);
    if (b.row_bytes != 0 && n_cells > UINT64_MAX / b.row_bytes) {
        throw invalid_argument("KV state: " + string(what) + " size overflows");
    }
    b.data = r.skip(b.row_bytes * n_cells, what);
    return b;
}

tensor_block read_transposed(reader & r, uint32_t n_cells, int32_t il) {
    tensor_block b;
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

vector<uint8_t> psg_rewrite_state(const vector<uint8_t> & blob, const psg_state_shape & shape,
                                  const vector<int32_t> & keep, int32_t n_keep, const vector<int32_t> & cell_pos,
                                  int32_t seq_out) {
    const int32_t L = shape.n_layer, G = shape.n_head_kv, C = n_keep;
    if (L < 1 || G < 1) {
        throw invalid_argument("KV state: the model has no layers or KV heads");
    }
    if (C < 1) {
        throw invalid_argument("keep at least one KV entry per layer and head");
    }
    if (keep.size() != (size_t) L * G * C) {
        throw invalid_argument("kept entries must be [n_layer=" + to_string(L) + ", n_head_kv=" + to_string(G) +
                               ", C] with one C for every layer and head");
    }
    if (cell_pos.size() != (size_t) C) {
        throw invalid_argument("cell positions: " + to_string(cell_pos.size()) + " given for " + to_string(C) +
                               " kept entries per head");
    }
    for (int32_t i = 0; i < C; ++i) {
        if (cell_pos[i] < 0 || (i > 0 && cell_pos[i] <= cell_pos[i - 1])) {
            throw invalid_argument("cell positions must be >= 0 and strictly increasing");
        }
    }

    // ---- parse (everything checked before anything is written)
    reader r{blob};
    if (r.get<uint32_t>("magic") != STATE_SEQ_MAGIC) {
        throw invalid_argument("KV state blob has the wrong magic; not a sequence state of this llama.cpp build");
    }
    r.get<int32_t>("sequence id");
    const uint32_t n_stream = r.get<uint32_t>("stream count");
    if (n_stream != 1) {
        throw invalid_argument("KV state has " + to_string(n_stream) + " streams; per-head eviction supports one "
                               "(a unified KV cache)");
    }
    const uint32_t n_cells = r.get<uint32_t>("cell count");
    if (n_cells == 0) {
        throw invalid_argument("KV state holds no cells");
    }
    std::unordered_map<int32_t, int32_t> cell_of; // position -> cell index in the blob
    cell_of.reserve(n_cells);
    for (uint32_t i = 0; i < n_cells; ++i) {
        const int32_t pos = r.get<int32_t>("cell position");
        const uint32_t n_seq = r.get<uint32_t>("cell sequence count");
        if (n_seq != 1) {
            throw invalid_argument("KV state: cell " + to_string(i) + " belongs to " + to_string(n_seq) +
                                   " sequences; a single-sequence state has one");
        }
        r.get<int32_t>("cell sequence id");
        if (!cell_of.emplace(pos, (int32_t) i).second) {
            throw invalid_argument("KV state holds position " + to_string(pos) + " twice");
        }
    }
    const uint32_t v_trans = r.get<uint32_t>("v_trans");
    const uint32_t n_layer = r.get<uint32_t>("layer count");
    if (v_trans > 1) {
        throw invalid_argument("KV state: v_trans is " + to_string(v_trans) + " (a different state format)");
    }
    if (n_layer != (uint32_t) L) {
        throw invalid_argument("KV state has " + to_string(n_layer) + " layers, the model " + to_string(L) +
                               " (layers without their own KV are not supported)");
    }
    vector<tensor_block> k(L), v(L);
    vector<uint64_t> k_slice(L), v_slice(L);
    for (int32_t il = 0; il < L; ++il) {
        k[il] = read_rows(r, n_cells, "K", il);
        k_slice[il] = head_slice_bytes(k[il], G, "K", il);
    }
    for (int32_t il = 0; il < L; ++il) {
        if (v_trans) {
            v[il] = read_transposed(r, n_cells, il);
            if (v[il].n_embd % (uint32_t) G != 0) {
                throw invalid_argument("KV state: V of layer " + to_string(il) + " has " + to_string(v[il].n_embd) +
                                       " rows, not a multiple of " + to_string(G) + " heads");
            }
        } else {
            v[il] = read_rows(r, n_cells, "V", il);
            v_slice[il] = head_slice_bytes(v[il], G, "V", il);
        }
    }
    if (r.off != blob.size()) {
        throw invalid_argument("KV state blob has " + to_string(blob.size() - r.off) + " unexpected trailing bytes "
                               "(a memory type or format this build does not handle)");
    }

    // ---- map kept positions to blob cells; each head's list must be distinct
    vector<int32_t> src(keep.size());
    vector<int32_t> seen(n_cells, -1);
    for (int32_t lh = 0; lh < L * G; ++lh) {
        for (int32_t i = 0; i < C; ++i) {
            const int32_t p = keep[(size_t) lh * C + i];
            auto it = cell_of.find(p);
            if (it == cell_of.end()) {
                throw invalid_argument("kept position " + to_string(p) + " (layer " + to_string(lh / G) + ", KV head " +
                                       to_string(lh % G) + ") is not in the sequence");
            }
            if (seen[it->second] == lh) {
                throw invalid_argument("layer " + to_string(lh / G) + ", KV head " + to_string(lh % G) +
                                       " keeps position " + to_string(p) + " twice");
            }
            seen[it->second] = lh;
            src[(size_t) lh * C + i] = it->second;
        }
    }

    // ---- write
    vector<uint8_t> out;
    size_t size = 16 + (size_t) C * 12 + 8;
    for (int32_t il = 0; il < L; ++il) {
        size += 12 + k[il].row_bytes * C;
        size += v_trans ? 12 + (size_t) v[il].n_embd * C * v[il].el_bytes : 12 + v[il].row_bytes * C;
    }
    out.reserve(size);
    writer w{out};
    w.put<uint32_t>(STATE_SEQ_MAGIC);
    w.put<int32_t>(seq_out);
    w.put<uint32_t>(1);
    w.put<uint32_t>((uint32_t) C);
    for (int32_t i = 0; i < C; ++i) {
        w.put<int32_t>(cell_pos[i]);
        w.put<uint32_t>(1);
        w.put<int32_t>(seq_out);
    }
    w.put<uint32_t>(v_trans);
    w.put<uint32_t>(n_layer);

    auto put_rows = [&](const tensor_block & b, uint64_t slice, int32_t il) {
        w.put<int32_t>(b.type);
        w.put<uint64_t>(b.row_bytes);
        const size_t at = out.size();
        out.resize(at + b.row_bytes * C);
        uint8_t * dst = out.data() + at;
        for (int32_t i = 0; i < C; ++i) {
            for (int32_t h = 0; h < G; ++h) {
                const int32_t cell = src[((size_t) il * G + h) * C + i];
                memcpy(dst + i * b.row_bytes + h * slice, blob.data() + b.data + cell * b.row_bytes + h * slice, slice);
            }
        }
    };
    for (int32_t il = 0; il < L; ++il) {
        put_rows(k[il], k_slice[il], il);
    }
    for (int32_t il = 0; il < L; ++il) {
        const tensor_block & b = v[il];
        if (!v_trans) {
            put_rows(b, v_slice[il], il);
            continue;
        }
        // Vᵀ: n_embd rows of one element per cell; head h owns a block of rows
        w.put<int32_t>(b.type);
        w.put<uint32_t>(b.el_bytes);
        w.put<uint32_t>(b.n_embd);
        const uint32_t rows_per_head = b.n_embd / (uint32_t) G;
        const size_t at = out.size();
        out.resize(at + (size_t) b.n_embd * C * b.el_bytes);
        uint8_t * dst = out.data() + at;
        const uint8_t * base = blob.data() + b.data;
        for (uint32_t j = 0; j < b.n_embd; ++j) {
            const int32_t * cells = src.data() + ((size_t) il * G + j / rows_per_head) * C;
            const uint8_t * row = base + (size_t) j * n_cells * b.el_bytes;
            uint8_t * out_row = dst + (size_t) j * C * b.el_bytes;
            for (int32_t i = 0; i < C; ++i) {
                memcpy(out_row + (size_t) i * b.el_bytes, row + (size_t) cells[i] * b.el_bytes, b.el_bytes);
            }
        }
    }
    return out;
}

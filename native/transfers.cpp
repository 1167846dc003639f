#include "transfers.h"

#include <atomic>

namespace {
// contexts decode with the GIL released, so two threads may count at once
std::atomic<uint64_t> calls[PSG_TRANSFER_KINDS];
std::atomic<uint64_t> bytes[PSG_TRANSFER_KINDS];
}  // namespace

void psg_count_transfer(psg_transfer_kind kind, size_t n) {
    calls[kind].fetch_add(1, std::memory_order_relaxed);
    bytes[kind].fetch_add(n, std::memory_order_relaxed);
}

psg_transfer_count psg_transfers(psg_transfer_kind kind) {
    psg_transfer_count out;
    out.calls = calls[kind].load(std::memory_order_relaxed);
    out.bytes = bytes[kind].load(std::memory_order_relaxed);
    return out;
}

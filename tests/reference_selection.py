"""Plain-Python references of the selection rules, written from the
algorithm text with loops and lists, for the production code to match index
for index."""

import math

import numpy as np


def pool(scores, k, how="max"):
    left = (k - 1) // 2
    right = k - 1 - left
    padded = [0.0] * left + [float(s) for s in scores] + [0.0] * right
    out = []
    for i in range(len(scores)):
        win = padded[i:i + k]
        out.append(max(win) if how == "max" else sum(win) / k)
    return [float(np.float32(x)) for x in out]


def ranked(pooled, raw):
    return sorted(range(len(pooled)), key=lambda i: (-pooled[i], -raw[i], i))


def dedupe(seq):
    seen, out = set(), []
    for x in seq:
        if x not in seen:
            seen.add(x)
            out.append(x)
    return out


def forced(n, window, budget, protected):
    w = min(window, budget, n)
    return dedupe(list(range(n - w, n)) + list(protected or []))


def specpc(raw, budget, window, kernel, neighbours, how="max", protected=None):
    n = len(raw)
    if n <= budget:
        return list(range(n))
    top = ranked(pool(raw, kernel, how) if kernel > 1 else list(raw), raw)[:budget]
    lo = -((neighbours - 1) // 2)
    offsets = sorted(range(lo, lo + neighbours), key=lambda o: (abs(o), o))
    widened = [min(max(i + o, 0), n - 1) for i in top for o in offsets]
    return sorted(dedupe(forced(n, window, budget, protected) + widened)[:budget])


def topk(raw, budget, window, kernel, how="max", protected=None):
    n = len(raw)
    if n <= budget:
        return list(range(n))
    order = forced(n, window, budget, protected) + ranked(pool(raw, kernel, how) if kernel > 1 else list(raw), raw)
    return sorted(dedupe(order)[:budget])


def chunks(raw, budget, chunk, window=0, protected=None):
    n = len(raw)
    if n <= budget:
        return list(range(n))
    kept = set(forced(n, window, budget, protected)[:budget])
    spans = [list(range(c, min(n, c + chunk))) for c in range(0, n, chunk)]
    means = [sum(raw[i] for i in s) / len(s) for s in spans]
    for c in sorted(range(len(spans)), key=lambda c: (-means[c], c)):
        new = [i for i in spans[c] if i not in kept]
        if len(kept) + len(new) <= budget:
            kept.update(new)
    return sorted(kept)


def is_sorted_unique(xs):
    return all(a < b for a, b in zip(xs, xs[1:])) and not any(math.isnan(x) for x in xs)

// optkern's framework-free C++ API for nonlinear conjugate gradients: the fused direction kernel
// v = beta v - g, written in place, returning the slope v.g in the same pass (ncg_rules.h).
//
// Passes per NCG iteration (the design of optkern.ncg_minimize): beta needs g_t.g_t and g_t.g_{t-1}, which need
// all of g_t before any element of v_t can be written, so one pass cannot both finish beta's dots and write v_t.
// The dots are instead taken where g_t is read anyway: the line search's slope pass at each trial point
// (lbfgs_dots of {v, g_{t-1}, g_t} with the query g_t: g_t.v, g_t.g_{t-1}, g_t.g_t in one read of v, g_{t-1}
// and g_t).  The direction is then this one pass: read g and v, write v, and return v.g (the next line search's
// initial slope) with no pass of its own.  g_{t-1} is never copied: the caller keeps the previous gradient's
// buffer.
#pragma once

#include "lbfgs_api.h"
#include "ncg_rules.h"

namespace optkern {

// v = ncg_dir(beta, v, g) elementwise in place (beta == 0: v = -g, v is not read, so it may hold anything),
// and returns dot(v_new, g) in the order of lbfgs_rules.h (bitwise lbfgs_dots({v_new}, {g})).  g: a batch of
// one vector (its dtype, device, n and stream are the call's); v: n elements of that dtype on that device, not
// overlapping g.  On CUDA the call synchronizes the stream once to return the slope.
// Throws std::invalid_argument for a g batch of other than one vector, a null pointer, or a non-finite beta.
double ncg_direction(const VecBatch& g, void* v, double beta);

}  // namespace optkern

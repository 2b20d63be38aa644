// Memory-overlap checks shared by every front end (the Python bindings, the C interface): a step writes params
// and states in place, so no written buffer may share a byte with another buffer of the call.
#pragma once

#include <algorithm>
#include <cstdint>
#include <vector>

namespace optkern {

struct MemRange {
  uintptr_t begin, end;  // [begin, end), non-empty
  bool writable;
  int id;                // the caller's name for the buffer
};

// The first overlap in address order between a written range and any other range (two read-only ranges may
// overlap): returns true with *a the later-starting range's id and *b the earlier one's.  Sorts `ranges`.
inline bool find_write_overlap(std::vector<MemRange>& ranges, int* a, int* b) {
  std::sort(ranges.begin(), ranges.end(), [](const MemRange& x, const MemRange& y) { return x.begin < y.begin; });
  uintptr_t end_all = 0, end_w = 0;
  int who_all = -1, who_w = -1;
  for (const MemRange& r : ranges) {
    int other = -1;
    if (r.begin < end_w) other = who_w;
    else if (r.writable && r.begin < end_all) other = who_all;
    if (other >= 0) {
      *a = r.id;
      *b = other;
      return true;
    }
    if (r.end > end_all) { end_all = r.end; who_all = r.id; }
    if (r.writable && r.end > end_w) { end_w = r.end; who_w = r.id; }
  }
  return false;
}

}  // namespace optkern

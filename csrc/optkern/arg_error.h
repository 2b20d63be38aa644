// The core's argument errors: std::invalid_argument with a message that names the argument,
// "name: expected <what>, got <value>" (the binding turns it into ValueError).
#pragma once

#include <sstream>
#include <stdexcept>

namespace optkern {

[[noreturn]] inline void bad_arg(const char* name, const char* expected, double got) {
  std::ostringstream os;
  os.precision(17);
  os << name << ": expected " << expected << ", got " << got;
  throw std::invalid_argument(os.str());
}

}  // namespace optkern

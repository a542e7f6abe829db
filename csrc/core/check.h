#pragma once
// Errors are exceptions that pybind11 turns into Python RuntimeError: a library must never exit()
// or abort its host process, whose other ranks would then hang in their next collective.
#include <cuda_runtime.h>

#include <sstream>
#include <stdexcept>
#include <string>

namespace symcomm {

class Error : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

[[noreturn]] inline void fail(const char* file, int line, const std::string& msg) {
  std::ostringstream s;
  s << "symcomm: " << msg << " (" << file << ":" << line << ")";
  throw Error(s.str());
}

}  // namespace symcomm

#define SYMCOMM_CHECK(cond, msg)                                      \
  do {                                                                \
    if (!(cond)) ::symcomm::fail(__FILE__, __LINE__, std::string(msg)); \
  } while (0)

#define SYMCOMM_CUDA_CHECK(expr)                                                         \
  do {                                                                                   \
    cudaError_t err_ = (expr);                                                           \
    if (err_ != cudaSuccess)                                                             \
      ::symcomm::fail(__FILE__, __LINE__, std::string(#expr " failed: ") + cudaGetErrorString(err_)); \
  } while (0)

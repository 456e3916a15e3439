// The table of host-compiled kernels: for each extern "C" kernel, its name, a
// thunk that calls it with cuLaunchKernel-style arguments (an array of pointers
// to the values), and its parameter types as text, e.g. "p:f32,i64,i32", which
// the launch checks against what the Rust launch plan passes. build.rs generates
// one table per kernel file ($OUT_DIR/host_<file>.cpp) and the lookup.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <type_traits>
#include <utility>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace smtl_host {

struct KernelEntry {
  const char *name;
  void (*thunk)(void **args);
  std::string (*signature)();
};

// The kernel named `name`, or null (defined by the generated lookup).
const KernelEntry *find_kernel(const char *name);

template <typename T, typename = void> struct TypeName;
template <> struct TypeName<float> { static constexpr const char *text = "f32"; };
template <> struct TypeName<double> { static constexpr const char *text = "f64"; };
template <> struct TypeName<__half> { static constexpr const char *text = "f16"; };
template <> struct TypeName<__nv_bfloat16> { static constexpr const char *text = "bf16"; };
template <> struct TypeName<bool> { static constexpr const char *text = "bool"; };
template <> struct TypeName<char> { static constexpr const char *text = "i8"; };
// Integers by signedness and width, whatever the C spelling (long, long long, size_t).
template <typename T>
struct TypeName<T, typename std::enable_if<std::is_integral<T>::value && !std::is_same<T, bool>::value &&
                                           !std::is_same<T, char>::value>::type> {
  static constexpr const char *text = std::is_signed<T>::value
                                          ? (sizeof(T) == 1 ? "i8" : sizeof(T) == 2 ? "i16" : sizeof(T) == 4 ? "i32" : "i64")
                                          : (sizeof(T) == 1 ? "u8" : sizeof(T) == 2 ? "u16" : sizeof(T) == 4 ? "u32" : "u64");
};

template <typename T> std::string type_text() {
  if constexpr (std::is_pointer<T>::value) {
    return std::string("p:") + TypeName<typename std::remove_cv<typename std::remove_pointer<T>::type>::type>::text;
  } else {
    return TypeName<typename std::remove_cv<T>::type>::text;
  }
}

template <typename F> struct Kernel;
template <typename... A> struct Kernel<void (*)(A...)> {
  template <auto F, size_t... I> static void call(void **args, std::index_sequence<I...>) {
    F(*static_cast<typename std::remove_cv<A>::type *>(args[I])...);
  }
  static std::string signature() {
    std::string s;
    ((s += (s.empty() ? "" : ","), s += type_text<A>()), ...);
    return s;
  }
  static constexpr size_t arity = sizeof...(A);
};

template <auto F> void thunk(void **args) {
  using K = Kernel<decltype(F)>;
  K::template call<F>(args, std::make_index_sequence<K::arity>{});
}

template <auto F> std::string signature() { return Kernel<decltype(F)>::signature(); }

}  // namespace smtl_host

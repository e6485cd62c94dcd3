// AMX tile set-up shared by the CPU kernels (woq_kernels.cpp, skinny_gemm.cpp).
#pragma once

#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <cstdint>
#include <cstring>

namespace amx {

struct alignas(64) TileConfig {
  uint8_t palette_id;
  uint8_t start_row;
  uint8_t reserved[14];
  uint16_t colsb[16];
  uint8_t rows[16];
};

// Linux grants a process the AMX tile state only when asked (arch_prctl), once.
inline bool ready() {
  static const bool granted = [] {
    constexpr int kArchReqXcompPerm = 0x1023;
    constexpr int kXfeatureXtiledata = 18;
    return syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0;
  }();
  return granted;
}

// Palette 1, all eight tiles at their largest: 16 rows of 64 bytes (for this thread).
inline void configure_tiles() {
  TileConfig cfg;
  std::memset(&cfg, 0, sizeof(cfg));
  cfg.palette_id = 1;
  for (int t = 0; t < 8; ++t) {
    cfg.rows[t] = 16;
    cfg.colsb[t] = 64;
  }
  // GCC's _tile_loadconfig tells the compiler it reads only the first 8 bytes, so the stores to
  // rows and colsb can be dropped as dead (seen with GCC 12: every tile then has 0 rows and the
  // first tile instruction faults). This asm reads the whole 64-byte configuration.
  __asm__ volatile("ldtilecfg %0" : : "m"(cfg));
}

}  // namespace amx

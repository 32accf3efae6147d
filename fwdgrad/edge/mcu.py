"""The generated C runtime (`fwdgrad.edge.cgen`) on an emulated Cortex-M (microcontroller runtime, phase 2).

`build(bundle, out_dir, input_shape, batch, board, device=...)` generates ``model.h``/``model.c`` and writes a
bare-metal application around them (a 16-entry vector table and reset handler, a linker script per board and
device, a main), builds it with arm-none-eabi-gcc; `run(info, bundle, infer, train codes/labels, eval, ...)`
writes the work as files (plan.bin, infer.bin, train.bin, eval.bin) and runs the ELF under
``qemu-system-arm -M <board> -semihosting`` with the build folder as its working directory. The main streams
the files in through semihosting (SYS_OPEN/SYS_READ): `infer` on each sample of infer.bin, one `train_step`
per batch of train.bin, `infer` on eval.bin; it prints logits codes, losses, tick counts and the trained
weights over semihosting (SYS_WRITE0), then exits through SYS_EXIT (status 0, or 1 on a fault or a short
file). `run_mcu` is both in one call. `python -m fwdgrad.edge mcu` is the command line.

Boards (`BOARDS`, `BOARD_MEMORY`): mps2-an385 (Cortex-M3) and mps2-an500 (Cortex-M7), 4 MiB of RAM at 0x0
and at 0x20000000; mps3-an547 (Cortex-M55, SSE-300, built as plain integer code: +nofp+nomve), 512 KiB ITCM
at 0x0 and 512 KiB DTCM at 0x20000000. The linker script (`linker_script`) places code and constants in the
first (FLASH) and data, bss and a stack reservation in the second (RAM), cut to a device profile's flash and
SRAM when `build` gets one (a model that does not fit fails the link with a one-line MCUError).
Instruction counts: QEMU is run with ``-icount shift=0`` (virtual time advances exactly 1 ns per executed
guest instruction) and the main reads SysTick, clocked by the CPU clock (wraps counted by its interrupt),
around every `infer` and `train_step` call: ``TICK_INSTRUCTIONS[board]`` instructions per tick, 40 on the
MPS2 boards (25 MHz), 31.25 on the AN547 (32 MHz), so each count is exact to within one tick; `calibrate`
measures it with a spin loop of known instruction count. QEMU 7.2 implements no DWT cycle counter (CYCCNT
reads 0) and Debian ships no TCG plugins.

Flash and SRAM use come from the linker map ``app.map`` (`link_map`, after --gc-sections; flash = text +
rodata + data, SRAM = data + bss), for the whole application and for ``model.o`` alone; the stack is the
separate reservation (`STACK_BYTES` by default), the stack pointer starts at the top of RAM.

Without the toolchain, `unavailable()` gives a one-line reason (and `run_mcu` raises `MCUError` with it).
"""

from __future__ import annotations

import os
import re
import shutil
import string
import subprocess
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from .bundle import Bundle
from .cgen import generate_c
from .ops import storage

#: board -> -mcpu. The M55 builds plain integer Armv8.1-M code (soft-float ABI, no FPU, no MVE: the startup
#: does not enable the coprocessors), the same code gcc 12 emits for plain -mcpu=cortex-m55 with soft float.
BOARDS = {"mps2-an385": "cortex-m3", "mps2-an500": "cortex-m7", "mps3-an547": "cortex-m55+nofp+nomve"}
#: board -> (code origin, code bytes, RAM origin, RAM bytes) of the linker script's FLASH and RAM regions.
#: MPS2 (AN385, AN500): 4 MiB SSRAM1 at 0x0, 4 MiB SSRAM2&3 at 0x20000000. MPS3 AN547 (SSE-300): 512 KiB
#: ITCM at 0x0 (secure alias 0x10000000, where the reset VTOR points) and 512 KiB DTCM at 0x20000000; its
#: 2 MiB SRAM (0x01000000), 4 MiB "SRAM 2" (0x21000000), 8 MiB QSPI ROM (0x28000000) and DDR (0x60000000)
#: sit behind TrustZone MPCs and are not used.
BOARD_MEMORY = {
    "mps2-an385": (0x00000000, 4 << 20, 0x20000000, 4 << 20),
    "mps2-an500": (0x00000000, 4 << 20, 0x20000000, 4 << 20),
    "mps3-an547": (0x00000000, 512 << 10, 0x20000000, 512 << 10),
}
CC, SIZE, QEMU = "arm-none-eabi-gcc", "arm-none-eabi-size", "qemu-system-arm"
CFLAGS = ["-std=c99", "-O2", "-Wall", "-Wextra", "-Werror", "-fno-strict-aliasing", "-mthumb"]
CFLAGS += ["-ffunction-sections", "-fdata-sections", "-fcallgraph-info=su"]  # .ci call graphs: `stack_usage`
#: board -> guest instructions per SysTick tick: -icount shift=0 runs 1 ns per instruction and SysTick counts
#: the CPU clock, 25 MHz on the MPS2 boards (40 ns), 32 MHz on the MPS3 AN547 (31.25 ns); `calibrate` checks.
TICK_INSTRUCTIONS = {"mps2-an385": 40, "mps2-an500": 40, "mps3-an547": 31.25}
STACK_BYTES = 8192  # the stack reservation `build` places in RAM (a NOLOAD section, counted in the fit)


class MCUError(RuntimeError):
    """The Cortex-M build or run failed (or the toolchain is missing): a one-line reason."""


def unavailable(board: str | None = None) -> str | None:
    """None when arm-none-eabi-gcc (with newlib's rdimon) and qemu-system-arm are installed (and, given a
    `board`, when this QEMU emulates it), else why not."""
    missing = [t for t in (CC, SIZE, QEMU) if shutil.which(t) is None]
    if missing:
        return (
            f"no {', '.join(missing)} on PATH (packages gcc-arm-none-eabi, libnewlib-arm-none-eabi, "
            "qemu-system-arm)"
        )
    res = subprocess.run([CC, "--specs=rdimon.specs", "-print-file-name=librdimon.a"], capture_output=True)
    if res.returncode != 0 or not os.path.isabs(res.stdout.decode().strip()):
        return "arm-none-eabi-gcc has no newlib/rdimon (package libnewlib-arm-none-eabi)"
    if board is not None:
        res = subprocess.run([QEMU, "-M", "help"], capture_output=True, text=True)
        if board not in {line.split(" ", 1)[0] for line in res.stdout.splitlines()}:
            return f"{QEMU} has no board {board} (QEMU >= 6.1 emulates mps3-an547)"
    return None


LINKER = """/* Generated by fwdgrad.edge.mcu for $board: FLASH $flash_what, RAM $ram_what. */
ENTRY(reset_handler)
MEMORY
{
    FLASH (rx) : ORIGIN = $flash_origin, LENGTH = $flash_bytes
    RAM (rwx) : ORIGIN = $ram_origin, LENGTH = $ram_bytes
}
SECTIONS
{
    .text : { KEEP(*(.vectors)) *(.text*) *(.rodata*) . = ALIGN(4); } > FLASH
    .ARM.exidx : { *(.ARM.exidx*) } > FLASH
    .data : { _sdata = .; *(.data*) . = ALIGN(4); _edata = .; } > RAM AT > FLASH
    _sidata = LOADADDR(.data);
    .bss (NOLOAD) : { _sbss = .; *(.bss*) *(COMMON) . = ALIGN(4); _ebss = .; } > RAM
    /* the stack reservation (counted in the fit); the stack starts at the top of RAM, above it */
    .stack (NOLOAD) : ALIGN(8) { _sstack_reserved = .; . += $stack_bytes; } > RAM
    end = .;
    _end = .;
    _estack = ORIGIN(RAM) + LENGTH(RAM);
}
"""

STARTUP = r"""/* Generated by fwdgrad.edge.mcu: vector table, reset handler, semihosting output and exit. */
#include <stdint.h>
#include "mcu.h"

extern uint32_t _sidata, _sdata, _edata, _sbss, _ebss, _estack;
int main(void);
static volatile uint32_t systick_wraps;

#define SYST_CSR (*(volatile uint32_t *)0xE000E010)
#define SYST_RVR (*(volatile uint32_t *)0xE000E014)
#define SYST_CVR (*(volatile uint32_t *)0xE000E018)

static void systick_handler(void) { systick_wraps++; }

void mcu_ticks_start(void) {
    SYST_RVR = 0xFFFFFFu;
    SYST_CVR = 0;
    SYST_CSR = 7; /* CPU clock, interrupt on wrap, enabled */
    while (SYST_CVR == 0) {
    }
}

uint64_t mcu_ticks(void) { /* SysTick ticks since mcu_ticks_start (it counts down from 2^24 - 1) */
    uint32_t w, v;
    do {
        w = systick_wraps;
        v = SYST_CVR;
    } while (w != systick_wraps);
    return (uint64_t)w * 0x1000000u + (0xFFFFFFu - v);
}

static int semihost(int op, const void *arg) {
    register int r0 __asm__("r0") = op;
    register const void *r1 __asm__("r1") = arg;
    __asm__ volatile("bkpt 0xAB" : "+r"(r0) : "r"(r1) : "memory");
    return r0;
}

void mcu_puts(const char *s) { semihost(0x04, s); } /* SYS_WRITE0 */

int mcu_open(const char *name) { /* SYS_OPEN, mode 1 ("rb"): a handle, or -1 */
    uint32_t args[3];
    const char *e = name;
    while (*e) e++;
    args[0] = (uint32_t)name;
    args[1] = 1;
    args[2] = (uint32_t)(e - name);
    return semihost(0x01, args);
}

long mcu_read(int handle, void *buf, long bytes) { /* SYS_READ: the number of bytes NOT read */
    uint32_t args[3];
    args[0] = (uint32_t)handle;
    args[1] = (uint32_t)buf;
    args[2] = (uint32_t)bytes;
    return semihost(0x06, args);
}

void mcu_close(int handle) { /* SYS_CLOSE */
    uint32_t args[1];
    args[0] = (uint32_t)handle;
    semihost(0x02, args);
}

void mcu_exit(int status) {
    /* SYS_EXIT: ADP_Stopped_ApplicationExit (QEMU exit status 0) or ADP_Stopped_RunTimeErrorUnknown (1) */
    semihost(0x18, (const void *)(status == 0 ? 0x20026 : 0x20023));
    for (;;) {
    }
}

void mcu_put_int(int64_t v) {
    char buf[24];
    int i = 23;
    uint64_t u = v < 0 ? (uint64_t)0 - (uint64_t)v : (uint64_t)v;
    buf[i] = 0;
    do {
        buf[--i] = (char)('0' + (int)(u % 10u));
        u /= 10u;
    } while (u);
    if (v < 0) buf[--i] = '-';
    buf[--i] = ' ';
    mcu_puts(buf + i);
}

void reset_handler(void) {
    uint32_t *s = &_sidata, *d = &_sdata;
    while (d < &_edata) *d++ = *s++;
    for (d = &_sbss; d < &_ebss; d++) *d = 0;
    mcu_exit(main());
}

static void fault_handler(void) {
    mcu_puts("FAULT\n");
    mcu_exit(1);
}

__attribute__((section(".vectors"), used)) void (*const vectors[16])(void) = {
    (void (*)(void))(&_estack), reset_handler, fault_handler, fault_handler, fault_handler, fault_handler,
    fault_handler, 0, 0, 0, 0, fault_handler, fault_handler, 0, fault_handler, systick_handler,
};
"""

MCU_H = """/* Generated by fwdgrad.edge.mcu */
#include <stdint.h>
void mcu_puts(const char *s);
int mcu_open(const char *name);
long mcu_read(int handle, void *buf, long bytes);
void mcu_close(int handle);
void mcu_put_int(int64_t v);
void mcu_exit(int status);
void mcu_ticks_start(void);
uint64_t mcu_ticks(void);
"""

MAIN = r"""/* Generated by fwdgrad.edge.mcu. Streams its work in through semihosting files (read from QEMU's
   working directory) and its results out over semihosting:
     plan.bin   int32 n_infer, n_steps, n_eval
     infer.bin  n_infer samples of input codes        -> "L <logit codes>" and "I <ticks>" per sample
     train.bin  n_steps batches: BATCH samples of input codes, then BATCH int32 labels
                                                       -> "S <2m losses>" and "T <ticks>" per train_step
     eval.bin   n_eval samples, run after training     -> "E <logit codes>" per sample
   then "W <t> <weights>" per trained tensor and "END". Ticks: SysTick ticks of each infer / train_step. */
#include "mcu.h"
#include "model.h"

#define BATCH {batch}
#define TRAINING {training}
static model_input_t xbuf[BATCH * MODEL_INPUT_SIZE];
static int32_t ybuf[BATCH];

static void print_codes(const char *tag, const int32_t *codes, int n) {{
    int e;
    mcu_puts(tag);
    for (e = 0; e < n; e++) mcu_put_int(codes[e]);
    mcu_puts("\n");
}}

static int open_or_fail(const char *name) {{
    int h = mcu_open(name);
    if (h < 0) {{
        mcu_puts("cannot open ");
        mcu_puts(name);
        mcu_puts("\n");
        mcu_exit(1);
    }}
    return h;
}}

static void read_or_fail(int h, void *buf, long bytes) {{
    if (mcu_read(h, buf, bytes) != 0) {{
        mcu_puts("input file ended early\n");
        mcu_exit(1);
    }}
}}

static void infer_file(const char *name, const char *tag, int n, int ticks) {{
    int32_t logits[MODEL_OUTPUT_SIZE];
    int h, i;
    uint64_t t0;
    if (!n) return;
    h = open_or_fail(name);
    for (i = 0; i < n; i++) {{
        read_or_fail(h, xbuf, (long)sizeof(model_input_t) * MODEL_INPUT_SIZE);
        t0 = mcu_ticks();
        infer(xbuf, logits);
        t0 = mcu_ticks() - t0;
        print_codes(tag, logits, MODEL_OUTPUT_SIZE);
        if (ticks) {{
            mcu_puts("I");
            mcu_put_int((int64_t)t0);
            mcu_puts("\n");
        }}
    }}
    mcu_close(h);
}}

int main(void) {{
    int32_t plan[3];
    int h;
    mcu_ticks_start();
    h = open_or_fail("plan.bin");
    read_or_fail(h, plan, sizeof plan);
    mcu_close(h);
    infer_file("infer.bin", "L", plan[0], 1);
#if TRAINING
    if (plan[1]) {{
        int i, e;
        h = open_or_fail("train.bin");
        for (i = 0; i < plan[1]; i++) {{
            int64_t losses[2 * MODEL_M];
            uint64_t t0;
            read_or_fail(h, xbuf, (long)sizeof xbuf);
            read_or_fail(h, ybuf, (long)sizeof ybuf);
            t0 = mcu_ticks();
            train_step(xbuf, ybuf, BATCH, losses);
            t0 = mcu_ticks() - t0;
            mcu_puts("S");
            for (e = 0; e < 2 * MODEL_M; e++) mcu_put_int(losses[e]);
            mcu_puts("\nT");
            mcu_put_int((int64_t)t0);
            mcu_puts("\n");
        }}
        mcu_close(h);
    }}
#endif
    infer_file("eval.bin", "E", plan[2], 0);
{weights}    mcu_puts("END\n");
    return 0;
}}
"""

WEIGHTS_MAIN = r"""    {{
        const {ctype} *w = (const {ctype} *)model_weights({t});
        int e;
        mcu_puts("W");
        mcu_put_int({t});
        for (e = 0; e < model_weight_count({t}); e++) mcu_put_int(w[e]);
        mcu_puts("\n");
    }}
"""


@dataclass
class MCUResult:
    logits: np.ndarray  # (n, classes) int64 logits codes of every sample inferred before training
    eval_logits: np.ndarray  # (n, classes) int64 logits codes of every sample inferred after training
    losses: list[list[int]] = field(default_factory=list)  # per step: the 2m integer batch losses
    weights: dict[int, np.ndarray] = field(default_factory=dict)  # trained tensor index -> weights
    flash_bytes: int = 0  # application: text + data
    sram_bytes: int = 0  # application: data + bss (no stack)
    model_flash_bytes: int = 0  # model.o alone
    model_sram_bytes: int = 0
    infer_instructions: list[int] = field(default_factory=list)  # per infer call (to within 40)
    step_instructions: list[int] = field(default_factory=list)  # per train_step call (to within 40)
    output: str = ""


def _tool(cmd: list[str], what: str, timeout: float = 120) -> str:
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise MCUError(f"{what} timed out after {timeout:g} s") from None
    if res.returncode != 0:
        tail = (res.stderr or res.stdout).strip().splitlines()[-1:] or [""]
        raise MCUError(f"{what} failed (exit {res.returncode}): {tail[0][:300]}")
    return res.stdout


def _arch(board: str) -> list[str]:
    """The compiler and linker flags that select `board`'s core, Thumb code and newlib's semihosting."""
    return [f"-mcpu={BOARDS[board]}", "-mthumb", "--specs=rdimon.specs"]


def _write(out_dir, files: dict[str, str]) -> None:
    """The generated sources (name -> text) into `out_dir`."""
    for name, text in files.items():
        with open(os.path.join(out_dir, name), "w") as f:
            f.write(text)


DEVICE_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "conf", "device")


def device_profile(name: str) -> dict:
    """The device profile ``fwdgrad/conf/device/<name>.yaml`` as a dict (name, sram_bytes, flash_bytes, ...),
    read with PyYAML (no torch or Hydra); MCUError naming the allowed names for an unknown one."""
    names = sorted(f[:-5] for f in os.listdir(DEVICE_DIR) if f.endswith(".yaml"))
    if name not in names:
        raise MCUError(f"unknown device {name!r}; allowed: {', '.join(names)}")
    try:
        import yaml
    except ImportError:
        raise MCUError("reading a device profile needs PyYAML (pip install pyyaml)") from None
    with open(os.path.join(DEVICE_DIR, f"{name}.yaml")) as f:
        return yaml.safe_load(f)


def _device(device) -> dict | None:
    """`build`'s device: None, a profile name, or a mapping (or an object such as
    `fwdgrad.analysis.devices.DeviceProfile`) with name, sram_bytes and flash_bytes."""
    if device is None:
        return None
    if isinstance(device, str):
        dev = device_profile(device)
    elif isinstance(device, Mapping):
        dev = device
    else:
        dev = {k: getattr(device, k, None) for k in ("name", "sram_bytes", "flash_bytes")}
    try:
        return {
            "name": str(dev["name"]),
            "sram_bytes": int(dev["sram_bytes"]),
            "flash_bytes": int(dev["flash_bytes"]),
        }
    except (KeyError, TypeError, ValueError):
        raise MCUError(
            f"device {device!r} is invalid; needs name, sram_bytes and flash_bytes (bytes)"
        ) from None


def _regions(board: str, device: dict | None) -> dict:
    """The FLASH and RAM regions for `board` (BOARD_MEMORY) cut to the `device` profile's flash and SRAM:
    {"FLASH"/"RAM": (origin, bytes, whose limit: "the board X" or "the profile Y")}."""
    f0, fn, r0, rn = BOARD_MEMORY[board]
    regions = {"FLASH": (f0, fn, f"the board {board}"), "RAM": (r0, rn, f"the board {board}")}
    if device:
        for region, key in (("FLASH", "flash_bytes"), ("RAM", "sram_bytes")):
            if device[key] < regions[region][1]:
                regions[region] = (regions[region][0], device[key], f"the profile {device['name']}")
    return regions


def linker_script(board: str = "mps2-an385", device=None, stack_bytes: int = STACK_BYTES) -> str:
    """The linker script for `board`: FLASH (code, constants, .data's initial values) and RAM (.data, .bss,
    a NOLOAD .stack reservation of `stack_bytes`) of the board's memories, cut to `device`'s flash_bytes /
    sram_bytes (a profile name or mapping, see `build`)."""
    if board not in BOARDS:
        raise MCUError(f"unknown board {board!r}; known: {', '.join(BOARDS)}")
    if not (isinstance(stack_bytes, int) and stack_bytes >= 0):
        raise MCUError(f"stack_bytes={stack_bytes!r} is invalid; allowed: an integer >= 0")
    regions = _regions(board, _device(device))
    (fo, fn, fw), (ro, rn, rw) = regions["FLASH"], regions["RAM"]
    return string.Template(LINKER).substitute(
        board=board,
        flash_what=f"{fn:,} B ({fw})",
        ram_what=f"{rn:,} B ({rw})",
        flash_origin=f"0x{fo:08X}",
        flash_bytes=fn,
        ram_origin=f"0x{ro:08X}",
        ram_bytes=rn,
        stack_bytes=stack_bytes,
    )


def _link(cmd: list[str], board: str, device: dict | None, stack_bytes: int) -> None:
    """Run the link; a FLASH or RAM overflow becomes one line: what needs how many bytes against which
    limit (the device profile's or the board's)."""
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    if res.returncode == 0:
        return
    over = {
        m[0]: int(m[1]) for m in re.findall(r"region `(FLASH|RAM)' overflowed by (\d+) bytes", res.stderr)
    }
    if not over:
        tail = (res.stderr or res.stdout).strip().splitlines()[-1:] or [""]
        raise MCUError(f"arm-none-eabi-gcc link failed (exit {res.returncode}): {tail[0][:300]}")
    regions = _regions(board, device)
    what = {
        "FLASH": ("flash", "code + constants + data"),
        "RAM": ("SRAM", f"data + bss + {stack_bytes:,} B stack"),
    }
    parts = []
    for region in ("FLASH", "RAM"):
        if region in over:
            _, have, whose = regions[region]
            label, parts_of = what[region]
            need = have + over[region]
            parts.append(
                f"{label} needs {need:,} B ({parts_of}), {whose} has {have:,} B (over by {over[region]:,} B)"
            )
    subject = f"model does not fit {device['name']}" if device else f"application does not fit {board}"
    raise MCUError(f"{subject}: {'; '.join(parts)}")


def link_map(path) -> dict:
    """Flash and SRAM bytes per object file from a GNU ld map (``-Wl,-Map``): {object basename: {"text",
    "data", "bss", "stack", "flash", "sram"}} plus "app", the whole image. text = .text/.rodata/.ARM.exidx
    (FLASH), data = .data (RAM, its initial values in FLASH too), bss = .bss, stack = the .stack reservation;
    flash = text + data, sram = data + bss (without the stack). Fill and alignment padding count toward
    "app" only; objects are what survived --gc-sections."""
    kind = {".text": "text", ".ARM.exidx": "text", ".data": "data", ".bss": "bss", ".stack": "stack"}
    out: dict = {}
    app = dict.fromkeys(("text", "data", "bss", "stack"), 0)
    with open(path) as f:
        lines = f.read().split("Linker script and memory map", 1)[-1].splitlines()
    section, pending = None, None
    for line in lines:
        m = re.match(r"^(\.[\w.]+)\s+0x([0-9a-f]+)\s+0x([0-9a-f]+)", line)
        if m or re.match(r"^\.[\w.]+\s*$", line):  # an output section (its figures maybe on the next line)
            section = kind.get(line.split()[0])
            if m and section:
                app[section] += int(m[3], 16)
            pending = None if m else section
            continue
        if pending and (m := re.match(r"^\s+0x([0-9a-f]+)\s+0x([0-9a-f]+)", line)):
            app[pending] += int(m[2], 16)
            pending = None
            continue
        m = re.match(r"^ ?(?:\.[\w.$]+)?\s+0x([0-9a-f]+)\s+0x([0-9a-f]+)\s+(\S+\.o\S*)$", line)
        if section and m and int(m[2], 16):
            obj = os.path.basename(m[3].split("(")[0]) if "(" not in m[3] else m[3].split("(")[-1].rstrip(")")
            d = out.setdefault(obj, dict.fromkeys(("text", "data", "bss", "stack"), 0))
            d[section] += int(m[2], 16)
    for d in (*out.values(), app):
        d["flash"], d["sram"] = d["text"] + d["data"], d["data"] + d["bss"]
    return {**out, "app": app}


def stack_usage(paths, root: str = "reset_handler") -> dict:
    """Worst-case stack bytes from gcc's ``-fcallgraph-info=su`` call graphs (the .ci files `build` writes
    beside the objects): the deepest chain of static frame sizes from `root`, plus an exception entry (the
    8-word basic frame, no FP context: the code is integer-only) with the deepest handler chain on top
    (SysTick or the fault handler may interrupt anywhere). {"bytes", "path", "unknown": reached functions
    without a frame size (library code such as memcpy / memset, and libgcc helpers the call graph does not
    show are not counted either), "dynamic": reached functions with a dynamic frame}."""
    frames: dict[str, int | None] = {}
    edges: dict[str, set[str]] = {}
    dynamic: set[str] = set()
    for path in paths:
        with open(path) as f:
            for line in f:
                if line.startswith("node:"):
                    title = re.search(r'title: "([^"]+)"', line)[1]
                    m = re.search(r"(\d+) bytes \(([\w,]+)\)", line)
                    if m:
                        frames[title] = int(m[1])
                        if m[2] != "static":
                            dynamic.add(title)
                    else:
                        frames.setdefault(title, None)
                elif line.startswith("edge:"):
                    src, dst = re.search(r'sourcename: "([^"]+)" targetname: "([^"]+)"', line).groups()
                    edges.setdefault(src, set()).add(dst)
    memo: dict[str, tuple[int, list[str]]] = {}
    reached: set[str] = set()

    def deepest(fn: str, chain: tuple[str, ...]) -> tuple[int, list[str]]:
        if fn in chain:
            raise MCUError(f"recursion in the call graph: {' -> '.join((*chain, fn))}; no stack bound")
        if fn not in memo:
            reached.add(fn)
            below = [deepest(g, (*chain, fn)) for g in sorted(edges.get(fn, ()))]
            depth, path = max(below, default=(0, []))
            memo[fn] = ((frames.get(fn) or 0) + depth, [fn, *path])
        return memo[fn]

    depth, path = deepest(root, ())
    handlers = [h for h in frames if h.rsplit(":", 1)[-1] in ("systick_handler", "fault_handler")]
    irq, irq_path = max((deepest(h, ()) for h in handlers), default=(0, []))
    return {
        "bytes": depth + 32 + irq,
        "path": [p.rsplit(":", 1)[-1] for p in path],
        "interrupt": [p.rsplit(":", 1)[-1] for p in irq_path],
        "unknown": sorted(f for f in reached if frames.get(f) is None),
        "dynamic": sorted(dynamic & reached),
    }


def ticks_to_instructions(ticks: int, board: str) -> int:
    """SysTick ticks -> guest instructions on `board` (TICK_INSTRUCTIONS; exact to within one tick)."""
    return round(ticks * TICK_INSTRUCTIONS[board])


CALIBRATE_MAIN = r"""/* Generated by fwdgrad.edge.mcu: SysTick ticks of {n} and {n2} spin loop iterations. */
#include "mcu.h"
static void spin(uint32_t n) {{ __asm__ volatile("1: subs %0, %0, #1\n bne 1b" : "+r"(n) : : "cc"); }}
int main(void) {{
    uint64_t t0, t1, t2;
    mcu_ticks_start();
    t0 = mcu_ticks();
    spin({n}u);
    t1 = mcu_ticks();
    spin({n2}u);
    t2 = mcu_ticks();
    mcu_puts("C");
    mcu_put_int((int64_t)(t1 - t0));
    mcu_put_int((int64_t)(t2 - t1));
    mcu_puts("\n");
    return 0;
}}
"""


def calibrate(board: str, out_dir, iterations: int = 500_000) -> float:
    """Guest instructions per SysTick tick on `board`, measured: a two-instruction spin loop (subs, bne) of
    `iterations` and of 2 x `iterations` iterations under ``-icount shift=0``; the difference of their tick
    counts (call overhead cancels) over the 2 x `iterations` instructions the longer loop adds."""
    reason = unavailable(board)
    if reason:
        raise MCUError(reason)
    os.makedirs(out_dir, exist_ok=True)
    files = {
        "main.c": CALIBRATE_MAIN.format(n=iterations, n2=2 * iterations),
        "startup.c": STARTUP,
        "mcu.h": MCU_H,
        "app.ld": linker_script(board),
    }
    _write(out_dir, files)
    elf = os.path.join(out_dir, "calibrate.elf")
    srcs = [os.path.join(out_dir, s) for s in ("main.c", "startup.c")]
    ld = os.path.join(out_dir, "app.ld")
    cmd = [CC, *CFLAGS, *_arch(board), "-nostartfiles", "-T", ld, *srcs, "-o", elf]
    _tool(cmd, "arm-none-eabi-gcc calibrate")
    out = run_qemu(elf, board)
    ticks = next((line.split()[1:] for line in out.splitlines() if line.startswith("C ")), None)
    if not ticks:
        raise MCUError(f"calibration on {board} printed no ticks: {out.strip()[-200:]!r}")
    return 2 * iterations / (int(ticks[1]) - int(ticks[0]))


def build(
    bundle: Bundle,
    out_dir,
    input_shape=None,
    batch: int = 8,
    board: str = "mps2-an385",
    prefix_samples: int | None = None,
    device=None,
    stack_bytes: int = STACK_BYTES,
) -> dict:
    """Generate and build ``app.elf`` in `out_dir` for `board`: the model (`generate_c`, its prefix store
    holding `prefix_samples` samples, default `batch`) and a main that streams its work in from files (see
    MAIN; `run` writes them), training on batches of `batch` samples. The ELF does not depend on the data.
    Returns {"elf", "flash_bytes_app", "sram_bytes_app", "model_flash_bytes", "model_sram_bytes",
    **generate_c's info}.

    Linked against `linker_script`: the board's FLASH and RAM, cut to a `device` profile (a name in
    fwdgrad/conf/device, see `device_profile`, or a mapping with name, sram_bytes and flash_bytes), RAM also
    holding a `stack_bytes` stack reservation; a model that does not fit raises a one-line MCUError. Sizes
    come from the linker map ``app.map`` (`link_map`, after --gc-sections): flash = text + data, SRAM =
    data + bss without the stack; "memory" holds every figure, "map" the map's path."""
    if board not in BOARDS:
        raise MCUError(f"unknown board {board!r}; known: {', '.join(BOARDS)}")
    dev = _device(device)
    script = linker_script(board, dev, stack_bytes)
    if not (isinstance(batch, int) and batch >= 1):
        raise MCUError(f"batch={batch!r} is invalid; allowed: an integer >= 1")
    reason = unavailable(board)
    if reason:
        raise MCUError(reason)
    shape = input_shape or (bundle.header.get("preprocessing") or {}).get("shape")
    info = generate_c(bundle, out_dir, shape, prefix_samples=prefix_samples or batch)
    training = bool(bundle.training and bundle.training.get("tensors"))
    weights = ""
    for t, spec in enumerate(bundle.training["tensors"] if training else []):
        dt = bundle.arrays[f"{spec['name']}.weight"].dtype
        weights += WEIGHTS_MAIN.format(ctype=f"{dt.name}_t", t=t)
    main = MAIN.format(batch=batch, training=int(training), weights=weights)
    _write(out_dir, {"main.c": main, "startup.c": STARTUP, "mcu.h": MCU_H, "app.ld": script})
    arch = _arch(board)
    flags = [*CFLAGS, *arch]
    objs = []
    for src in ("model.c", "main.c", "startup.c"):
        obj = os.path.join(out_dir, src[:-2] + ".o")
        _tool([CC, *flags, "-c", os.path.join(out_dir, src), "-o", obj], f"arm-none-eabi-gcc {src}")
        objs.append(obj)
    elf = os.path.join(out_dir, "app.elf")
    mapfile = os.path.join(out_dir, "app.map")
    link = [*arch, "-nostartfiles", "-T", os.path.join(out_dir, "app.ld"), "-Wl,--gc-sections"]
    _link([CC, *link, f"-Wl,-Map={mapfile}", *objs, "-o", elf], board, dev, stack_bytes)
    sizes = link_map(mapfile)
    app, model = sizes["app"], sizes.get("model.o", dict.fromkeys(("flash", "sram"), 0))
    stack = stack_usage([obj[:-2] + ".ci" for obj in objs])
    regions = _regions(board, dev)
    memory = {
        "board": board,
        "device": dev,
        "flash_region_bytes": regions["FLASH"][1],
        "ram_region_bytes": regions["RAM"][1],
        "stack_bytes": stack_bytes,
        "stack_static_bytes": stack[
            "bytes"
        ],  # `stack_usage`: call-graph worst case (library frames not counted)
        "stack_path": stack["path"],
        "objects": sizes,
    }
    return {
        **info,
        "elf": elf,
        "map": mapfile,
        "memory": memory,
        "flash_bytes_app": app["flash"],
        "sram_bytes_app": app["sram"],
        "model_flash_bytes": model["flash"],
        "model_sram_bytes": model["sram"],
    }


def run_qemu(
    elf: str, board: str = "mps2-an385", timeout: float = 60, cwd=None, icount: bool = True, on_line=None
) -> str:
    """Run `elf` under qemu-system-arm with semihosting (files relative to `cwd`) and, with `icount`,
    ``-icount shift=0`` (exact instruction counts); its output, each line also passed to `on_line` as it
    arrives (MCUError on a non-zero exit or after `timeout` seconds)."""
    if board not in BOARDS:
        raise MCUError(f"unknown board {board!r}; known: {', '.join(BOARDS)}")
    cmd = [QEMU, "-M", board, *(["-icount", "shift=0"] if icount else [])]
    cmd += ["-nographic", "-monitor", "none", "-serial", "none"]
    cmd += ["-semihosting-config", "enable=on,target=native", "-kernel", os.path.abspath(elf)]
    what = f"qemu-system-arm -M {board}"
    with subprocess.Popen(
        cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    ) as proc:  # semihosting writes to stderr
        fired: list[bool] = []
        timer = threading.Timer(timeout, lambda: (fired.append(True), proc.kill()))
        timer.start()
        lines = []
        try:
            for line in proc.stdout:
                lines.append(line)
                if on_line:
                    on_line(line)
            proc.wait()
        finally:
            timer.cancel()
            proc.kill()
    if proc.returncode != 0:
        if fired:
            raise MCUError(f"{what} timed out after {timeout:g} s")
        tail = "".join(lines).strip().splitlines()[-1:] or [""]
        raise MCUError(f"{what} failed (exit {proc.returncode}): {tail[0][:300]}")
    return "".join(lines)


def _codes(bundle: Bundle, codes) -> np.ndarray:
    """Input codes in the C runtime's model_input_t (the input format's storage dtype), one row per sample."""
    spec = bundle.header["input"]
    dtype = storage(spec["qmin"], spec["qmax"])
    codes = np.asarray(codes)
    if codes.size and (codes.min() < spec["qmin"] or codes.max() > spec["qmax"]):
        raise MCUError(f"input codes {codes.min()}..{codes.max()} outside [{spec['qmin']}, {spec['qmax']}]")
    return np.ascontiguousarray(codes.astype(dtype).reshape(len(codes), -1))


def run(
    info: dict,
    bundle: Bundle,
    infer_codes=None,
    train_codes=None,
    train_labels=None,
    eval_codes=None,
    batch: int = 8,
    board: str = "mps2-an385",
    timeout: float = 60,
    icount: bool = True,
    on_line=None,
) -> MCUResult:
    """Run a `build`'s ELF: write plan.bin, infer.bin, train.bin and eval.bin beside it and stream them in.
    The application infers `infer_codes`, trains one step per `batch` rows of `train_codes` /
    `train_labels` (their length a multiple of `batch`), then infers `eval_codes`; parsed into an
    MCUResult. `on_line`: called with each output line as it arrives (progress)."""
    out_dir = os.path.dirname(info["elf"])
    parts = {"infer": infer_codes, "eval": eval_codes}
    files = {k: _codes(bundle, v) if v is not None else None for k, v in parts.items()}
    steps = 0
    train = b""
    if train_codes is not None:
        x, y = _codes(bundle, train_codes), np.asarray(train_labels, np.int32)
        if len(x) != len(y) or len(x) % batch:
            raise MCUError(
                f"{len(x)} training samples and {len(y)} labels: need equal counts, a multiple of {batch}"
            )
        if not (bundle.training and bundle.training.get("tensors")):
            raise MCUError("train steps need a bundle with training settings and trainable tensors")
        steps = len(x) // batch
        train = b"".join(
            x[k * batch : (k + 1) * batch].tobytes() + y[k * batch : (k + 1) * batch].tobytes()
            for k in range(steps)
        )
    counts = [
        0 if files["infer"] is None else len(files["infer"]),
        steps,
        0 if files["eval"] is None else len(files["eval"]),
    ]
    blobs = {
        "plan.bin": np.array(counts, np.int32).tobytes(),
        "infer.bin": b"" if files["infer"] is None else files["infer"].tobytes(),
        "train.bin": train,
        "eval.bin": b"" if files["eval"] is None else files["eval"].tobytes(),
    }
    for name, blob in blobs.items():
        with open(os.path.join(out_dir, name), "wb") as f:
            f.write(blob)
    out = run_qemu(info["elf"], board, timeout, cwd=out_dir, icount=icount, on_line=on_line)
    if "END" not in out.split():
        raise MCUError(f"the application on {board} stopped early: {out.strip()[-200:]!r}")
    res = MCUResult(
        logits=np.zeros((0, 0), np.int64),
        eval_logits=np.zeros((0, 0), np.int64),
        flash_bytes=info["flash_bytes_app"],
        sram_bytes=info["sram_bytes_app"],
        model_flash_bytes=info["model_flash_bytes"],
        model_sram_bytes=info["model_sram_bytes"],
        output=out,
    )
    logits, evals = [], []
    for line in out.splitlines():
        tag, *vals = line.split() or [""]
        if tag == "L":
            logits.append([int(v) for v in vals])
        elif tag == "E":
            evals.append([int(v) for v in vals])
        elif tag == "S":
            res.losses.append([int(v) for v in vals])
        elif tag == "W":
            res.weights[int(vals[0])] = np.array([int(v) for v in vals[1:]], np.int64)
        elif tag == "I" and icount:
            res.infer_instructions.append(ticks_to_instructions(int(vals[0]), board))
        elif tag == "T" and icount:
            res.step_instructions.append(ticks_to_instructions(int(vals[0]), board))
    res.logits, res.eval_logits = np.array(logits, np.int64), np.array(evals, np.int64)
    return res


def run_mcu(
    bundle: Bundle,
    out_dir,
    codes: np.ndarray,
    labels=None,
    steps: int = 0,
    batch: int = 8,
    board: str = "mps2-an385",
    input_shape=None,
    timeout: float = 60,
) -> MCUResult:
    """`build` then `run`: infer every row of `codes`, then `steps` train_steps on its consecutive batches
    of `batch` rows (with `labels`); logits codes per sample, losses per step, trained weights and the
    instructions executed by each infer and train_step call."""
    codes = np.asarray(codes)
    if steps and (labels is None or min(len(labels), len(codes)) < steps * batch):
        raise MCUError(f"{steps} steps of {batch} need {steps * batch} samples and labels")
    info = build(bundle, out_dir, input_shape or codes.shape[1:], batch, board)
    n = steps * batch
    train = (codes[:n], np.asarray(labels)[:n]) if steps else (None, None)
    return run(info, bundle, codes, *train, batch=batch, board=board, timeout=timeout)

/*
 * A stand-in for NVIDIA's libnvidia-ml.so.1, for tests on machines without a GPU.
 * It implements only the calls kedge makes through nvml-wrapper (init, device
 * count, handle by index, utilization, memory info v2, shutdown, error string),
 * with the real ABI, so the real nvml-wrapper code path loads and calls it.
 *
 * Readings come from the file named by FAKE_NVML_STATE (a -D at build time):
 * one line per GPU, "utilization_pct memory_used_bytes memory_total_bytes",
 * re-read on every call so a test can drive the numbers while kedge runs.
 */
#include <stdio.h>

typedef int nvmlReturn_t;
typedef struct fake_device *nvmlDevice_t;
typedef struct { unsigned int gpu; unsigned int memory; } nvmlUtilization_t;
typedef struct {
    unsigned int version;
    unsigned long long total, reserved, free, used;
} nvmlMemory_v2_t;

#define NVML_SUCCESS 0
#define NVML_ERROR_UNINITIALIZED 1
#define NVML_ERROR_INVALID_ARGUMENT 2
#define NVML_ERROR_UNKNOWN 999
#define MAX_GPUS 16

static int initialized;
static struct fake_device { unsigned int index; } devices[MAX_GPUS];

static int read_state(unsigned int want, unsigned int *count,
                      unsigned int *util, unsigned long long *used, unsigned long long *total) {
    FILE *f = fopen(FAKE_NVML_STATE, "r");
    if (!f) return NVML_ERROR_UNKNOWN;
    unsigned int n = 0, u;
    unsigned long long us, t;
    while (n < MAX_GPUS && fscanf(f, "%u %llu %llu", &u, &us, &t) == 3) {
        if (n == want && util) { *util = u; *used = us; *total = t; }
        n++;
    }
    fclose(f);
    if (count) *count = n;
    return (util && want >= n) ? NVML_ERROR_INVALID_ARGUMENT : NVML_SUCCESS;
}

nvmlReturn_t nvmlInit_v2(void) { initialized = 1; return NVML_SUCCESS; }
nvmlReturn_t nvmlInitWithFlags(unsigned int flags) { (void)flags; return nvmlInit_v2(); }
nvmlReturn_t nvmlShutdown(void) { initialized = 0; return NVML_SUCCESS; }

const char *nvmlErrorString(nvmlReturn_t r) {
    switch (r) {
    case NVML_SUCCESS: return "Success";
    case NVML_ERROR_UNINITIALIZED: return "Uninitialized";
    case NVML_ERROR_INVALID_ARGUMENT: return "Invalid Argument";
    default: return "Unknown Error";
    }
}

nvmlReturn_t nvmlDeviceGetCount_v2(unsigned int *count) {
    if (!initialized) return NVML_ERROR_UNINITIALIZED;
    if (!count) return NVML_ERROR_INVALID_ARGUMENT;
    return read_state(0, count, 0, 0, 0);
}

nvmlReturn_t nvmlDeviceGetHandleByIndex_v2(unsigned int index, nvmlDevice_t *device) {
    if (!initialized) return NVML_ERROR_UNINITIALIZED;
    unsigned int count = 0;
    if (!device || index >= MAX_GPUS || read_state(0, &count, 0, 0, 0) || index >= count)
        return NVML_ERROR_INVALID_ARGUMENT;
    devices[index].index = index;
    *device = &devices[index];
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlDeviceGetUtilizationRates(nvmlDevice_t device, nvmlUtilization_t *u) {
    if (!initialized) return NVML_ERROR_UNINITIALIZED;
    if (!device || !u) return NVML_ERROR_INVALID_ARGUMENT;
    unsigned long long used, total;
    unsigned int util;
    nvmlReturn_t r = read_state(device->index, 0, &util, &used, &total);
    if (r) return r;
    u->gpu = util;
    u->memory = total ? (unsigned int)(used * 100 / total) : 0;
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlDeviceGetMemoryInfo_v2(nvmlDevice_t device, nvmlMemory_v2_t *m) {
    if (!initialized) return NVML_ERROR_UNINITIALIZED;
    if (!device || !m) return NVML_ERROR_INVALID_ARGUMENT;
    unsigned long long used, total;
    unsigned int util;
    nvmlReturn_t r = read_state(device->index, 0, &util, &used, &total);
    if (r) return r;
    m->total = total;
    m->used = used;
    m->reserved = 0;
    m->free = total - used;
    return NVML_SUCCESS;
}

/* ditrt C API: run the DiT class-conditional sampling loop (DDPM / DDIM with classifier-free
 * guidance) from an exported artifact's manifest.json, over a denoiser executor.
 *
 * Conventions (as ONNX Runtime's C API): opaque handles, every call returns a ditrt_status, the
 * message of the last failure on the calling thread is ditrt_last_error(). No C++ exception ever
 * crosses this boundary. Buffers are caller-owned host memory; sizes are counted in elements.
 * Thread safety: see README "Embedding in C++" (a pipeline serialises its own sample calls).
 */
#ifndef DITRT_DITRT_H
#define DITRT_DITRT_H

#include <stddef.h>
#include <stdint.h>

#if defined(_WIN32)
#define DITRT_API __declspec(dllexport)
#else
#define DITRT_API __attribute__((visibility("default")))
#endif

#ifdef __cplusplus
extern "C" {
#endif

#define DITRT_ABI_VERSION 1

typedef enum ditrt_status {
    DITRT_OK = 0,
    DITRT_INVALID_ARGUMENT = 1, /* null pointer, label out of range, unknown sampler / guidance, bad eta */
    DITRT_ARTIFACT_ERROR = 2,   /* missing / corrupt / unsupported manifest or file, sha256 mismatch */
    DITRT_SCHEDULE_ERROR = 3,   /* impossible step specification */
    DITRT_BUFFER_TOO_SMALL = 4, /* output buffer capacity below N * C * H * W floats */
    DITRT_EXECUTOR_ERROR = 5,   /* the denoiser failed (callback returned non-zero, TensorRT error) */
    DITRT_UNAVAILABLE = 6,      /* feature not compiled in (e.g. TensorRT) or no usable GPU / plan */
    DITRT_INTERNAL_ERROR = 7    /* out of memory or a bug: the message says what */
} ditrt_status;

typedef struct ditrt_executor ditrt_executor; /* runs the denoiser network */
typedef struct ditrt_pipeline ditrt_pipeline; /* an opened artifact bound to an executor */

/* The denoiser on host buffers: latent (rows, C, H, W) float32, timestep (rows,) float32
 * original-scale, class_label (rows,) int64 (num_classes = the null class); writes model_output
 * (rows, out_channels, H, W) float32. Return 0 on success, anything else is a failure. */
typedef int (*ditrt_denoiser_fn)(void* user, const float* latent, const float* timestep,
                                 const int64_t* class_label, int64_t rows, float* model_output);

/* ditrt_open flags */
#define DITRT_OPEN_DEFAULT 0u
#define DITRT_OPEN_NO_VERIFY 1u /* skip the sha256 check of graphs / plans before use */

/* ---- errors and versions ---- */
DITRT_API const char* ditrt_last_error(void); /* thread-local; "" after a success; never NULL */
DITRT_API const char* ditrt_status_name(ditrt_status status);
DITRT_API const char* ditrt_version(void);
DITRT_API int ditrt_has_tensorrt(void); /* 1 when built with -DDITRT_WITH_TENSORRT=ON */

/* ---- executors (release with ditrt_executor_release; a pipeline keeps its own reference) ---- */
/* max_batch: most rows per call (0: unlimited); the loop chunks larger steps. */
DITRT_API ditrt_status ditrt_executor_create_callback(ditrt_denoiser_fn fn, void* user, int64_t max_batch,
                                                      ditrt_executor** out);
/* The TensorRT executor: picks the manifest's plan that runs on this GPU / TensorRT when a
 * pipeline is opened with it. max_batch 0: the plan profile's maximum. DITRT_UNAVAILABLE when the
 * library was built without TensorRT. */
DITRT_API ditrt_status ditrt_executor_create_tensorrt(int cuda_device, int64_t max_batch, ditrt_executor** out);
DITRT_API void ditrt_executor_release(ditrt_executor* executor); /* NULL is fine */

/* ---- pipelines ---- */
/* Reads and checks <artifact_dir>/manifest.json (schema ditrt.manifest version 2) and binds the
 * executor to it (the TensorRT executor deserialises its plan here, sha256-checked unless
 * DITRT_OPEN_NO_VERIFY). */
DITRT_API ditrt_status ditrt_open(const char* artifact_dir, ditrt_executor* executor, uint32_t flags,
                                  ditrt_pipeline** out);
DITRT_API void ditrt_close(ditrt_pipeline* pipeline); /* NULL is fine */

/* Latent shape (C, H, W) of one image, and the number of real classes (labels 0..num_classes-1). */
DITRT_API ditrt_status ditrt_latent_shape(const ditrt_pipeline* pipeline, int64_t shape[3]);
DITRT_API ditrt_status ditrt_num_classes(const ditrt_pipeline* pipeline, int64_t* num_classes);
/* Number of model calls K for a step spec (NULL: the manifest default): the leading dimension of
 * injected step noise. */
DITRT_API ditrt_status ditrt_num_steps(const ditrt_pipeline* pipeline, const char* steps, int64_t* num_steps);
/* Path of a network's graph file (network "denoiser", precision "fp32" / "fp16"), checked against
 * the manifest's sha256 unless the pipeline was opened with DITRT_OPEN_NO_VERIFY: for callback
 * executors that load the graph themselves. `capacity` counts bytes including the terminating 0. */
DITRT_API ditrt_status ditrt_graph_file(const ditrt_pipeline* pipeline, const char* network, const char* precision,
                                        char* path, size_t capacity);

/* Sample latents for num_labels images into `out` ((N, C, H, W) float32, `out_capacity` floats).
 *  steps     respacing spec "250", "ddim50", "10,20,30"; NULL: manifest default
 *  sampler   "ddpm" or "ddim"; NULL: manifest default
 *  eta       DDIM eta in [0, 1] (ignored by ddpm)
 *  cfg_scale guidance scale, finite; > 1 runs the unconditional rows; NaN: manifest default
 *  guidance  a key of the manifest's diffusion.guided_channels ("official", "standard"); NULL: default
 *  noise     initial_noise (N, C, H, W) and step_noise (K, N, C, H, W), both or neither; step k is the
 *            k-th model call from the noisiest. When NULL, ditrt's seeded stream (docs/noise.md,
 *            ditrt_noise_normal) under `seed`: image i gets image index i, the initial noise is
 *            draw 0 and step k's noise draw k + 1, the same noise as the Python runtime's seed. */
DITRT_API ditrt_status ditrt_sample(ditrt_pipeline* pipeline, const int64_t* labels, int64_t num_labels,
                                    const char* steps, const char* sampler, double eta, double cfg_scale,
                                    const char* guidance, uint64_t seed, const float* initial_noise,
                                    const float* step_noise, float* out, int64_t out_capacity);

/* ---- the seeded noise stream (docs/noise.md) ---- */
/* The stream's name, e.g. "philox4x32-10+bm-poly/1": results can say which noise made them. */
DITRT_API const char* ditrt_noise_version(void);
/* The first `count` values (float32, C order over (C, H, W)) of draw `draw_index` of image
 * `image_index` under `seed`: draw 0 is the initial noise, draw k + 1 the noise of the k-th step
 * from the noisiest. Any draw without the earlier ones; identical to the Python runtime's
 * ditrt.runtime.noise.normal. DITRT_INVALID_ARGUMENT when out is NULL (and count > 0), count < 0
 * or > 2^34, or draw_index >= 2^32. */
DITRT_API ditrt_status ditrt_noise_normal(uint64_t seed, uint64_t image_index, uint64_t draw_index, float* out,
                                          int64_t count);

#ifdef __cplusplus
} /* extern "C" */
#endif

#endif /* DITRT_DITRT_H */

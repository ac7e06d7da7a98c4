/* ditrt C API, ABI version 2: the whole sampling job of an exported artifact (manifest.json) of
 * either family behind a C ABI: DiT's DDPM, DDIM and DPM-Solver++(2M) loops and SiT's ODE and SDE
 * loops with classifier-free guidance, the VAE decoder, images as uint8 and PNG, and ditrt's
 * seeded noise stream; the latents are bit-identical to the Python runtime's.
 *
 * ---- Conventions (as ONNX Runtime's C API) --------------------------------------------------------
 * - Opaque handles (ditrt_executor, ditrt_pipeline, ditrt_options), created by *_create / ditrt_open
 *   and released by their *_release / ditrt_close (NULL is accepted there and does nothing).
 * - Every fallible call returns a ditrt_status (an int; DITRT_OK = 0) and leaves its message in
 *   ditrt_last_error() ("" after a success; see Errors below). No C++ exception ever crosses this
 *   boundary. On failure, out-pointers are set to NULL / left unwritten
 *   and caller buffers are not written.
 * - Buffers are caller-owned host memory in C order; sizes ("capacity", "count") count elements
 *   (floats, bytes for uint8), not bytes, unless the name says bytes. Strings are NUL-terminated UTF-8.
 * - Arrays: latents (N, C, H, W) float32; injected step noise (K, N, C, H, W) float32; decoded
 *   images (N, 3, H_img, W_img) float32, nominally in [-1, 1]; uint8 images (N, H, W, 3).
 * - Versioning: DITRT_ABI_VERSION is the version this header describes; ditrt_abi_version() the
 *   library's at run time. A caller checks ditrt_abi_version() == DITRT_ABI_VERSION once before
 *   anything else (a library of another ABI version has other signatures). Options are string
 *   keys, so new samplers and options add keys, not signatures.
 *   ABI 1 (positional ditrt_sample, a denoiser-only callback) was REMOVED in ABI 2, not wrapped:
 *   the shared library's SONAME is libditrt.so.2.
 *
 * ---- Threads --------------------------------------------------------------------------------------
 * - A pipeline is read-only after ditrt_open: ditrt_sample / ditrt_decode / the getters may be
 *   called from any threads at once, on the same or on different pipelines. Each call keeps its
 *   own state (buffers, noise, schedule); no call waits for another.
 * - Executors are shared by the pipelines opened on them. A callback executor's function runs on
 *   the thread that called ditrt_sample / ditrt_decode, so with concurrent calls it runs
 *   concurrently: serialise inside it if your engine needs that. The TensorRT executor serialises
 *   its own runs.
 * - Re-entrancy: ditrt_sample and ditrt_decode called from inside a ditrt callback (the executor's
 *   function or a progress callback) on the same thread return DITRT_BUSY at once (they would
 *   otherwise re-enter a running executor). Every other function may be called from callbacks.
 *   A callback must not wait for another thread that calls ditrt_sample on the same executor
 *   while it runs (that is a deadlock ditrt cannot see).
 * - ditrt_close / *_release must not run while another thread uses that handle. Handles may be
 *   released in any order (a pipeline keeps its executor alive; an options object is not kept).
 * - ditrt_last_error() is per thread.
 *
 * ---- Errors ---------------------------------------------------------------------------------------
 * - After any fallible call (one that returns a ditrt_status) returns, ditrt_last_error() on that
 *   thread describes THAT call: its message on failure, "" on success. This holds also when the
 *   call's callbacks (its progress callback, a callback executor's function) made ditrt calls of
 *   their own, failing or not: a call made from inside a callback reports in a slot of its own, one
 *   level down, and never changes what its outer call reports.
 * - Inside a callback, ditrt_last_error() describes the latest ditrt call made from the callbacks
 *   of the running outer call, and is "" before they have made one (whatever the application's
 *   last call left): the outer call is still running and has no message yet.
 * - The calls that return no status (ditrt_last_error, ditrt_status_name, the version and build
 *   getters, ditrt_has_network, ditrt_close, the *_release functions, ditrt_free) leave it as it was:
 *   releasing the options after a failed ditrt_sample keeps that call's message.
 * - The string is ditrt's: read or copy it before this thread's next fallible ditrt call.
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

#define DITRT_ABI_VERSION 2

/* Status codes (the values are part of the ABI). */
typedef enum ditrt_status {
    DITRT_OK = 0,
    DITRT_INVALID_ARGUMENT = 1, /* a NULL pointer, a label out of range, an unknown sampler / guidance / option key,
                                   eta given to a sampler without one, cfg_scale not a finite float32, injected noise
                                   of the wrong size or holding NaN/inf, a buffer of more than 2^32 values */
    DITRT_ARTIFACT_ERROR = 2,   /* a missing / corrupt / unsupported manifest or file, a sha256 mismatch,
                                   an artifact without the network asked for (e.g. no decoder) */
    DITRT_SCHEDULE_ERROR = 3,   /* an impossible step specification for the sampler */
    DITRT_BUFFER_TOO_SMALL = 4, /* an output buffer's capacity is below what the call writes */
    DITRT_EXECUTOR_ERROR = 5,   /* a network failed (a callback returned non-zero, a TensorRT error) */
    DITRT_UNAVAILABLE = 6,      /* not compiled in (TensorRT) or no usable GPU / plan */
    DITRT_INTERNAL_ERROR = 7,   /* out of memory or a bug: the message says what */
    DITRT_CANCELLED = 8,        /* the progress callback returned non-zero; nothing was written */
    DITRT_STEP_ERROR = 9,       /* a step produced NaN or inf (the model output or cfg_scale overflows float32), or
                                   the decoder produced NaN/inf images */
    DITRT_BUSY = 10,            /* ditrt_sample / ditrt_decode called from inside a ditrt callback on this thread */
    DITRT_IO_ERROR = 11         /* a file could not be written (ditrt_png_write) */
} ditrt_status;

/* Element types of tensors (ditrt_tensor.dtype; the values are part of the ABI). */
typedef enum ditrt_dtype {
    DITRT_FLOAT32 = 1,
    DITRT_FLOAT16 = 2,
    DITRT_INT64 = 3,
    DITRT_INT32 = 4
} ditrt_dtype;

#define DITRT_MAX_RANK 8

/* One named tensor of a network call, as the manifest's networks.<network>.inputs / outputs name
 * it. Layout (88 bytes on LP64): const char* name; int32_t dtype; int32_t rank;
 * int64_t shape[8]; void* data. shape[0] is the batch (rows or images); shape[rank..7] are 0.
 * data is C-order host memory of shape[0] * ... * shape[rank-1] elements of dtype; inputs are
 * read-only, outputs are to be filled completely by the callback. */
typedef struct ditrt_tensor {
    const char* name;
    int32_t dtype; /* a ditrt_dtype */
    int32_t rank;
    int64_t shape[DITRT_MAX_RANK];
    void* data;
} ditrt_tensor;

typedef struct ditrt_executor ditrt_executor; /* runs an artifact's networks */
typedef struct ditrt_pipeline ditrt_pipeline; /* an opened artifact bound to an executor */
typedef struct ditrt_options ditrt_options;   /* the options of one ditrt_sample call */

/* The one executor callback: runs `network` ("denoiser", "decoder", ...) on host tensors. inputs
 * and outputs follow the order of the manifest's networks.<network>.inputs / outputs; every
 * pointer is valid only during the call. Return 0 on success; any other value fails the
 * ditrt_sample / ditrt_decode call with DITRT_EXECUTOR_ERROR.
 *
 * The networks of a DiT artifact (engines/README.md):
 *   "denoiser" inputs:  latent (rows, C, H, W) float32, the state x_t;
 *                       timestep (rows,) float32, original-scale timesteps (0..num_train_timesteps-1);
 *                       class_label (rows,) int64, 0..num_classes-1, num_classes = the null class.
 *              outputs: model_output (rows, out_channels, H, W) float32 (eps, then the variance
 *                       values when out_channels = 2 C).
 *              Under guidance (cfg_scale > 1) the rows are [x; x] with labels [y; null]: 2 per image.
 *   "decoder"  inputs:  latent (images, C, H, W) float32, DiT-scale latents (the graph divides by
 *                       the manifest's scaling_factor);
 *              outputs: image (images, 3, H_img, W_img) float32, nominally [-1, 1], not clamped.
 * shape[0] never exceeds the executor's max_batch (when not 0): ditrt splits larger calls. */
typedef int (*ditrt_run_fn)(void* user, const char* network, const ditrt_tensor* inputs, int64_t num_inputs,
                            const ditrt_tensor* outputs, int64_t num_outputs);

/* Progress: called after every model call (step) of ditrt_sample with the calls done (1..total),
 * the total number of calls K and the timestep of the call just done (DiT: the original-scale
 * timestep; SiT: t in [0, 1]). ode-dopri5's number of calls is known only after the run: it
 * reports total_steps 0 (show t as the fraction done; its last stages may pass t = 1 slightly). Return 0 to go on; any
 * other value cancels: ditrt_sample returns DITRT_CANCELLED before the next model call and writes
 * nothing to its output. */
typedef int (*ditrt_progress_fn)(void* user, int64_t steps_done, int64_t total_steps, double timestep);

/* ---- errors and versions ---------------------------------------------------------------------- */
DITRT_API uint32_t ditrt_abi_version(void);   /* DITRT_ABI_VERSION of the library */
DITRT_API const char* ditrt_last_error(void); /* per thread and call level (Errors); "" after a success; never NULL */
DITRT_API const char* ditrt_status_name(ditrt_status status); /* "DITRT_OK", ...; never NULL */
DITRT_API const char* ditrt_version(void);    /* the library's version, e.g. "0.3.0" */
DITRT_API int ditrt_has_tensorrt(void);       /* 1 when built with -DDITRT_WITH_TENSORRT=ON */

/* ---- executors ------------------------------------------------------------------------------- */
/* A callback executor: `fn` runs every network (see ditrt_run_fn); `user` is passed back to it and
 * must outlive every pipeline opened on the executor. max_batch: the most batch entries per call
 * (rows for the denoiser, images for the decoder); 0: unlimited. */
DITRT_API ditrt_status ditrt_executor_create_callback(ditrt_run_fn fn, void* user, int64_t max_batch,
                                                      ditrt_executor** out);
/* The TensorRT executor: when a pipeline is opened on it, it loads the manifest's plan of each
 * network (denoiser; decoder when the artifact has one and a plan of it exists) that runs on this
 * GPU and TensorRT, sha256-checked unless DITRT_OPEN_NO_VERIFY. max_batch 0: the plan profile's
 * maximum (denoiser rows). DITRT_UNAVAILABLE when the library was built without TensorRT. An
 * executor of this kind serves one artifact. */
DITRT_API ditrt_status ditrt_executor_create_tensorrt(int32_t cuda_device, int64_t max_batch, ditrt_executor** out);
DITRT_API void ditrt_executor_release(ditrt_executor* executor); /* NULL is fine */

/* ---- sample options (ditrt_sample; like ONNX Runtime's config entries) ----------------------------
 * Every key is optional; an unset key takes the manifest's `defaults` (sampler, steps, cfg_scale,
 * guidance, eta) or the value below. Keys and values are strings:
 *   "sampler"      DiT: "ddpm" | "ddim" | "dpm++2m"; SiT: "ode-euler" | "ode-heun2" | "ode-dopri5" |
 *                  "sde-euler" | "sde-heun"
 *   "steps"        ddpm / ddim: a respacing spec: "250" (N evenly spaced steps), "ddim50" (integer
 *                  stride), "10,20,30" (section counts); dpm++2m: the number of model calls, digits
 *                  only, 1 .. num_train_timesteps - 1 (e.g. "25"); SiT: --num-sampling-steps, digits,
 *                  2 .. 100000 (ODE grid linspace(0, 1, N); SDE linspace(0, 0.96, N))
 *   "cfg_scale"    a number as Python's float() reads it (ASCII: whitespace around, underscores between
 *                  digits, inf / nan; no hexadecimal); > 1 runs the unconditional rows; must be finite as float32
 *   "guidance"     a key of the manifest's guidance.guided_channels: "official" (3 channels guided,
 *                  the released DiT models' quirk) or "standard" (all latent channels)
 *   "eta"          ddim only (given to another sampler: DITRT_INVALID_ARGUMENT), in [0, 1]; default 0
 *                  or the manifest's defaults.eta
 *   "atol", "rtol" ode-dopri5 only, numbers in (0, 1]; default 1e-6 and 1e-3 (SiT's sample.py)
 *   "diffusion_form", "diffusion_norm", "last_step", "last_step_size"
 *                  sde-euler / sde-heun only; only SiT's defaults are implemented and accepted:
 *                  "sigma", 1.0, "Mean", 0.04 (another value: DITRT_INVALID_ARGUMENT)
 *                  Any sampler option given to a sampler that does not take it is DITRT_INVALID_ARGUMENT.
 *   "seed"         a decimal uint64 (default "0"): the seeded noise stream (docs/noise.md); image i
 *                  of the call is image image_offset + i of the stream, the initial noise is draw 0
 *                  and the k-th stochastic step's noise draw k + 1 (DiT: the k-th model call; SiT's
 *                  SDEs: the k-th of num_steps - 1 steps): the Python runtime's noise for the same seed
 *   "image_offset" a decimal uint64 (default "0"): the stream index of the call's first image (a
 *                  shard of a bigger job); refused with injected noise
 * ditrt_options_set: an unknown key or a value that does not parse as that key's type is
 * DITRT_INVALID_ARGUMENT; value NULL unsets the key. Whether a value fits the artifact (a known
 * sampler, steps that the schedule allows, ...) is checked by ditrt_sample / ditrt_num_steps. */
DITRT_API ditrt_status ditrt_options_create(ditrt_options** out);
DITRT_API void ditrt_options_release(ditrt_options* options); /* NULL is fine */
DITRT_API ditrt_status ditrt_options_set(ditrt_options* options, const char* key, const char* value);
/* Injected noise instead of the seeded stream: initial (N, C, H, W), initial_count = N*C*H*W
 * floats, and step noise (D, N, C, H, W), step_count = D*N*C*H*W floats, row k for the k-th
 * stochastic step from the noisiest. DiT: D = K = ditrt_num_steps (a row per model call); dpm++2m
 * draws no step noise: step may be NULL (step_count 0) or K rows that are not used. SiT: the SDEs
 * D = steps - 1 (not their model calls); the ODEs draw none: step NULL. The arrays are borrowed, not copied: they must stay
 * valid until the last ditrt_sample using these options returns. NaN or inf in them fails the
 * sample with DITRT_INVALID_ARGUMENT. initial NULL clears the injected noise (seeded again). */
DITRT_API ditrt_status ditrt_options_set_noise(ditrt_options* options, const float* initial, int64_t initial_count,
                                               const float* step, int64_t step_count);
/* The progress / cancel callback (NULL: none). */
DITRT_API ditrt_status ditrt_options_set_progress(ditrt_options* options, ditrt_progress_fn fn, void* user);

/* ---- pipelines ------------------------------------------------------------------------------- */
/* ditrt_open flags */
#define DITRT_OPEN_DEFAULT 0u
#define DITRT_OPEN_NO_VERIFY 1u /* skip the sha256 check of graphs / plans before use */

/* Reads and checks <artifact_dir>/manifest.json (schema ditrt.manifest version 3; versions 1 and
 * 2 are upgraded in memory) with every rule of the Python runtime's reader, and binds the executor
 * to it. A non-regular manifest.json (a FIFO, a device, a link to /dev/zero) or one above 16 MiB is
 * refused before it is read. Both families: DiT (the diffusion section) and SiT (model.family
 * "sit", the transport section). Failures: DITRT_ARTIFACT_ERROR with the field at fault in the message. */
DITRT_API ditrt_status ditrt_open(const char* artifact_dir, ditrt_executor* executor, uint32_t flags,
                                  ditrt_pipeline** out);
/* ditrt_open, refusing an artifact that does not match its signature (`ditrt sign`): before the
 * manifest is read, <artifact_dir>/model.sig (an OpenSSF model-signing bundle: a DSSE envelope over an
 * in-toto statement) must carry an ECDSA signature by the EC public key in the PEM file
 * `public_key_path` (P-256, P-384 or P-521) over the DSSE PAE of its statement, and every file in
 * the folder must match the statement's sha256 list: a changed, added or removed file, a missing
 * or foreign signature is DITRT_ARTIFACT_ERROR naming it; a key file that is not an EC public key
 * DITRT_INVALID_ARGUMENT. public_key_path NULL: exactly ditrt_open. DITRT_UNAVAILABLE when the
 * library was built without OpenSSL. Added in ABI 2 (a new symbol; ditrt_open is unchanged). */
DITRT_API ditrt_status ditrt_open_signed(const char* artifact_dir, ditrt_executor* executor, uint32_t flags,
                                         const char* public_key_path, ditrt_pipeline** out);
DITRT_API void ditrt_close(ditrt_pipeline* pipeline); /* NULL is fine */

/* Latent shape (C, H, W) of one image; the number of real classes (labels 0..num_classes-1). */
DITRT_API ditrt_status ditrt_latent_shape(const ditrt_pipeline* pipeline, int64_t shape[3]);
DITRT_API ditrt_status ditrt_num_classes(const ditrt_pipeline* pipeline, int64_t* num_classes);
/* The class label a name stands for, as the Python runtime resolves it (runtime/artifact/labels.py): a
 * decimal number 0..num_classes-1, or one of the comma-separated synonyms of an entry of the
 * manifest's id2label (surrounding whitespace stripped), e.g. "tench" or "goldfish". An unknown
 * name, a name of two classes (ambiguous), a number out of range, or a name given to an artifact
 * without id2label: DITRT_INVALID_ARGUMENT, the message says which. */
DITRT_API ditrt_status ditrt_label_of(const ditrt_pipeline* pipeline, const char* name, int64_t* label);
/* The number of model calls K of a sampling call with these options (NULL: the defaults), the
 * total the progress callback reports; for DiT also the leading dimension of injected step noise.
 * ode-dopri5 (adaptive) gives 0: its count is known only after the run. */
DITRT_API ditrt_status ditrt_num_steps(const ditrt_pipeline* pipeline, const ditrt_options* options, int64_t* num_steps);
/* 1 when the artifact has the network ("denoiser", "decoder"), else 0 (also for NULL arguments). */
DITRT_API int ditrt_has_network(const ditrt_pipeline* pipeline, const char* network);
/* The decoder's image shape (3, H_img, W_img); DITRT_ARTIFACT_ERROR when the artifact has no decoder. */
DITRT_API ditrt_status ditrt_image_shape(const ditrt_pipeline* pipeline, int64_t shape[3]);
/* Path of a network's graph file (precision "fp32", "fp16", or the denoiser's quantized "int8" /
 * "fp8" QDQ graphs, whose recipe the manifest reader has checked), checked against the manifest's
 * sha256 unless the pipeline was opened with DITRT_OPEN_NO_VERIFY: for callback executors that
 * load the graph themselves. `capacity` counts bytes including the terminating NUL. */
DITRT_API ditrt_status ditrt_graph_file(const ditrt_pipeline* pipeline, const char* network, const char* precision,
                                        char* path, size_t capacity);

/* Samples latents for num_labels (N >= 1) class labels into `out`: (N, C, H, W) float32,
 * out_capacity floats (at least N*C*H*W). options NULL: the manifest's defaults and seed 0.
 * The loop is the Python runtime's (runtime/execution/pipeline.py) in its float32 operation order: every
 * model call's output is guided (u + s (c - u) on the first guided_channels channels), stepped,
 * and checked for NaN/inf (DITRT_STEP_ERROR naming the step and timestep). `out` is written only
 * when every step succeeded. */
DITRT_API ditrt_status ditrt_sample(ditrt_pipeline* pipeline, const int64_t* labels, int64_t num_labels,
                                    const ditrt_options* options, float* out, int64_t out_capacity);

/* Decodes DiT-scale latents (N, C, H, W) float32 (the ditrt_sample output) with the artifact's
 * decoder network into images (N, 3, H_img, W_img) float32 (capacity floats), as the official
 * scripts' vae.decode(latents / scaling_factor).sample, not clamped. NaN/inf latents are
 * DITRT_INVALID_ARGUMENT, NaN/inf images DITRT_STEP_ERROR; no decoder: DITRT_ARTIFACT_ERROR. */
DITRT_API ditrt_status ditrt_decode(ditrt_pipeline* pipeline, const float* latents, int64_t num_images, float* images,
                                    int64_t capacity);

/* ---- images (byte-identical to ditrt.runtime.core.images) ------------------------------------------- */
#define DITRT_GRID_NROW 4    /* the official sample.py grid: 4 images per row ... */
#define DITRT_GRID_PADDING 2 /* ... 2 pixels of padding (value 0) */

/* (N, 3, H, W) float images -> (N, H, W, 3) uint8 (capacity bytes >= N*H*W*3): clamp(127.5 x + 128,
 * 0, 255) truncated, as sample_ddp.py saves each image. */
DITRT_API ditrt_status ditrt_images_to_uint8(const float* images, int64_t num_images, int64_t height, int64_t width,
                                             uint8_t* out, int64_t capacity);
/* The (height, width) of the grid of num_images images of (height, width) pixels: torchvision
 * make_grid with nrow images per row and `padding` pixels (a single image: itself, unpadded). */
DITRT_API ditrt_status ditrt_grid_shape(int64_t num_images, int64_t height, int64_t width, int64_t nrow,
                                        int64_t padding, int64_t grid_hw[2]);
/* The grid as one (grid_h, grid_w, 3) uint8 image (capacity bytes >= grid_h*grid_w*3), as
 * torchvision save_image(images, nrow, padding, normalize=True, value_range=(-1, 1)) (sample.py). */
DITRT_API ditrt_status ditrt_images_grid(const float* images, int64_t num_images, int64_t height, int64_t width,
                                         int64_t nrow, int64_t padding, uint8_t* out, int64_t capacity);
/* An (height, width, channels) uint8 image (channels 1: gray, 3: RGB) as PNG bytes (libpng): *png
 * is allocated by ditrt (free it with ditrt_free), *png_size its length in bytes. PNG bytes are
 * not canonical (zlib level, filters); the decoded pixels are exactly the input. */
DITRT_API ditrt_status ditrt_png_encode(const uint8_t* pixels, int64_t height, int64_t width, int64_t channels,
                                        uint8_t** png, int64_t* png_size);
/* The same PNG written to `path` atomically (a temporary name beside it, then rename). A path that
 * exists and is not a regular file (a directory, a symbolic link, a device) is refused. */
DITRT_API ditrt_status ditrt_png_write(const char* path, const uint8_t* pixels, int64_t height, int64_t width,
                                       int64_t channels);
DITRT_API void ditrt_free(void* memory); /* memory ditrt allocated (ditrt_png_encode); NULL is fine */

/* ---- the seeded noise stream (docs/noise.md) ---------------------------------------------------- */
/* The stream's name, e.g. "philox4x32-10+bm-poly/1": results can say which noise made them. */
DITRT_API const char* ditrt_noise_version(void);
/* The first `count` values (float32, C order over (C, H, W)) of draw `draw_index` of image
 * `image_index` under `seed`: draw 0 is the initial noise, draw k + 1 the noise of the k-th model
 * call from the noisiest. Any draw without the earlier ones; identical to the Python runtime's
 * ditrt.runtime.sampling.noise.normal. DITRT_INVALID_ARGUMENT when out is NULL (and count > 0), count < 0
 * or > 2^34, or draw_index >= 2^32. */
DITRT_API ditrt_status ditrt_noise_normal(uint64_t seed, uint64_t image_index, uint64_t draw_index, float* out,
                                          int64_t count);

#ifdef __cplusplus
} /* extern "C" */
#endif

#endif /* DITRT_DITRT_H */

/* Plain C interface of libsparge_spm.so, the SentencePiece wrapper that sparge_engine dlopen()s
 * (engine/models/tokenizer.cc): Debian's libsentencepiece exports its private protobuf 3.14, which
 * collides with the system protobuf that gRPC binaries load, so only C types cross this boundary.
 * Usage: load with sparge_spm_load, call the rest on the handle, release with sparge_spm_free.
 * Thread-safety: a loaded handle is immutable; every function but sparge_spm_free may be called
 * on it from any number of threads at once. */
#ifndef SPARGE_ENGINE_SPM_SHIM_SPM_SHIM_H_
#define SPARGE_ENGINE_SPM_SHIM_SPM_SHIM_H_

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* Bumped whenever a signature below changes, so that a stale installed shim is refused. */
#define SPARGE_SPM_ABI_VERSION 1

typedef struct SpargeSpm SpargeSpm;

int sparge_spm_abi_version(void);

/* Parses a serialized SentencePiece ModelProto. On failure returns NULL and writes a
 * NUL-terminated message (truncated to err_size bytes) into err, when err_size > 0. */
SpargeSpm* sparge_spm_load(const char* bytes, size_t size, char* err, size_t err_size);

/* Releases a handle from sparge_spm_load; NULL is ignored. */
void sparge_spm_free(SpargeSpm* spm);

int sparge_spm_vocab_size(const SpargeSpm* spm);
int sparge_spm_pad_id(const SpargeSpm* spm);
int sparge_spm_eos_id(const SpargeSpm* spm);

/* Id of a piece, or the unknown id when the vocabulary has no such piece. */
int sparge_spm_piece_to_id(const SpargeSpm* spm, const char* piece, size_t size);

/* Tokenizes text (no normalisation beyond the model's own). Returns the number of ids, writing
 * them into ids only when that number is <= capacity (otherwise call again with a larger buffer),
 * or -1 on failure with a message in err as for sparge_spm_load. */
int64_t sparge_spm_encode(const SpargeSpm* spm, const char* text, size_t size, int32_t* ids,
                          size_t capacity, char* err, size_t err_size);

#ifdef __cplusplus
} /* extern "C" */
#endif

#endif /* SPARGE_ENGINE_SPM_SHIM_SPM_SHIM_H_ */

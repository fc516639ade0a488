/* A stand-in for a GPU delegate that loads but rejects the model, as the real TFLite GPU delegate does
 * with ops it cannot run. It implements the external-delegate plugin interface that LiteRT's
 * `load_delegate` calls (tensorflow/lite/delegates/external/external_delegate_interface.h) and declares
 * the `TfLiteDelegate` layout of tensorflow/lite/core/c/common.h itself, so it builds with a bare C
 * compiler and no TensorFlow headers. Built by tests/test_edge_classify.py into a temporary folder. */
#include <stdint.h>
#include <stdlib.h>

typedef struct TfLiteDelegate {
    void *data_;
    int (*Prepare)(void *context, struct TfLiteDelegate *delegate);
    void *CopyFromBufferHandle;
    void *CopyToBufferHandle;
    void *FreeBufferHandle;
    int64_t flags;
    void *opaque_delegate_builder;
} TfLiteDelegate;

static int reject(void *context, TfLiteDelegate *delegate)
{
    (void)context;
    (void)delegate;
    return 1; /* kTfLiteError */
}

TfLiteDelegate *tflite_plugin_create_delegate(char **keys, char **values, size_t count,
                                              void (*report_error)(const char *))
{
    (void)keys;
    (void)values;
    (void)count;
    (void)report_error;
    TfLiteDelegate *delegate = calloc(1, sizeof *delegate);
    if (delegate) delegate->Prepare = reject;
    return delegate;
}

void tflite_plugin_destroy_delegate(TfLiteDelegate *delegate) { free(delegate); }

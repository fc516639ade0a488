/*
 * libFuzzer harness: the fast 1/8-scale decoder (preprocessing/_jpeg8.c) against libjpeg-turbo.
 *
 * For every input, the fast decoder runs on one thread and on two, and libjpeg decodes it the way
 * Pillow's draft() decode does (scale 1/8, default DCT method and upsampling, out_color_space RGB or
 * grayscale, jpeg_finish_decompress at the end; warnings printed nowhere). The rule it checks:
 *
 *   the fast decoder either declines (Pillow, i.e. libjpeg, decides) or gives libjpeg's verdict:
 *   libjpeg succeeds and every pixel is the same; and one and two threads agree.
 *
 * Anything else calls abort(), which libFuzzer reports as a crash and saves as crash-<sha1>.
 * Build: see fuzz/README.md (fuzz/build.sh).
 */
#define JPEG8_RUN_NO_MAIN
#include "jpeg8_run.c"

#include <jpeglib.h>
#include <setjmp.h>
#include <stdio.h>

typedef struct {
    struct jpeg_error_mgr pub;
    jmp_buf jump;
    int warnings;
    char message[JMSG_LENGTH_MAX];
} Errors;

static void on_error(j_common_ptr cinfo)
{
    Errors *e = (Errors *)cinfo->err;
    (*cinfo->err->format_message)(cinfo, e->message);
    longjmp(e->jump, 1);
}

static void on_emit(j_common_ptr cinfo, int level)
{
    if (level < 0) ((Errors *)cinfo->err)->warnings++;
}

static void on_output(j_common_ptr cinfo) { (void)cinfo; }

/* libjpeg's 1/8-scale decode, as Pillow's draft() runs it; NULL where libjpeg refuses. */
static uint8_t *libjpeg_eighth(const uint8_t *data, size_t size, int *w, int *h, int *c, Errors *e)
{
    struct jpeg_decompress_struct cinfo;
    uint8_t *volatile out = NULL;
    cinfo.err = jpeg_std_error(&e->pub);
    e->pub.error_exit = on_error;
    e->pub.emit_message = on_emit;
    e->pub.output_message = on_output;
    e->warnings = 0;
    e->message[0] = 0;
    if (setjmp(e->jump)) {
        jpeg_destroy_decompress(&cinfo);
        free(out);
        return NULL;
    }
    jpeg_create_decompress(&cinfo);
    jpeg_mem_src(&cinfo, data, (unsigned long)size);
    jpeg_read_header(&cinfo, TRUE);
    if (cinfo.num_components != 1 && cinfo.num_components != 3) { /* the fast path declines these */
        jpeg_destroy_decompress(&cinfo);
        return NULL;
    }
    if ((uint64_t)cinfo.image_width * cinfo.image_height > (uint64_t)MAX_PIXELS) {
        jpeg_destroy_decompress(&cinfo); /* the fast path declines these too: keep the fuzzer fast */
        return NULL;
    }
    cinfo.scale_num = 1;
    cinfo.scale_denom = 8;
    cinfo.out_color_space = cinfo.num_components == 1 ? JCS_GRAYSCALE : JCS_RGB;
    jpeg_start_decompress(&cinfo);
    *w = (int)cinfo.output_width;
    *h = (int)cinfo.output_height;
    *c = cinfo.output_components;
    size_t stride = (size_t)*w * *c;
    out = malloc(stride * *h + 1);
    if (!out) abort();
    while (cinfo.output_scanline < cinfo.output_height) {
        JSAMPROW row = out + stride * cinfo.output_scanline;
        jpeg_read_scanlines(&cinfo, &row, 1);
    }
    jpeg_finish_decompress(&cinfo);
    jpeg_destroy_decompress(&cinfo);
    return out;
}

int LLVMFuzzerInitialize(int *argc, char ***argv)
{
    (void)argc;
    (void)argv;
    jpeg8_init();
    MAX_SCRATCH_BYTES = SIZE_MAX; /* fuzz the big frames too (the extension declines them) */
    return 0;
}

static void finding(const char *what, const char *detail)
{
    fprintf(stderr, "\n*** jpeg8 finding: %s%s%s\n", what, detail && *detail ? ": " : "", detail ? detail : "");
    abort();
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    int w1 = 0, h1 = 0, c1 = 0, w2 = 0, h2 = 0, c2 = 0;
    uint8_t *one = jpeg8_decode(data, size, 1, &w1, &h1, &c1);
    uint8_t *two = jpeg8_decode(data, size, 2, &w2, &h2, &c2);
    if (!one != !two) finding("one and two threads disagree on declining", "");
    if (one && (w1 != w2 || h1 != h2 || c1 != c2 || memcmp(one, two, (size_t)w1 * h1 * c1) != 0))
        finding("one and two threads give different pixels", "");
    if (one) {
        Errors e;
        int w = 0, h = 0, c = 0;
        uint8_t *ref = libjpeg_eighth(data, size, &w, &h, &c, &e);
        if (!ref) finding("the fast path decoded what libjpeg refuses", e.message);
        if (w != w1 || h != h1 || c != c1) finding("the fast path's size differs from libjpeg's", "");
        if (memcmp(ref, one, (size_t)w * h * c) != 0) finding("a pixel differs from libjpeg's", "");
        free(ref);
    }
    free(one);
    free(two);
    return 0;
}

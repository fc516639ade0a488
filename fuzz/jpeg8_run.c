/*
 * jpeg8_run: run the fast decoder (preprocessing/_jpeg8.c, without Python) on files, one and two
 * threads, and print what it decided. No libjpeg needed: tests/test_fast_jpeg.py builds it with
 * -fsanitize=undefined,address (and without -fwrapv) to show that an input is free of undefined
 * behaviour; fuzz/jpeg8_fuzz.c is the differential harness.
 *
 *   cc -O1 -g -fsanitize=undefined,address -fno-sanitize-recover=all -pthread fuzz/jpeg8_run.c -o run
 *   ./run photo.jpg ...      # prints "photo.jpg: 500x375x3 a1b2c3d4" or "photo.jpg: declined"
 */
#define JPEG8_NO_PYTHON
#include "../preprocessing/_jpeg8.c"

#include <stdio.h>

/* Decode `data` at 1/8 scale; returns the pixels (free them) or NULL: declined. */
static uint8_t *jpeg8_decode(const uint8_t *data, size_t size, int threads, int *w, int *h, int *c)
{
    Jpeg *j = calloc(1, sizeof(Jpeg));
    uint8_t *out = NULL;
    if (!j) return NULL;
    ptrdiff_t start = jpeg8_prepare(j, data, (ptrdiff_t)size);
    if (start >= 0) {
        *w = (j->width + 7) / 8;
        *h = (j->height + 7) / 8;
        *c = j->ncomp;
        out = malloc((size_t)*w * *h * *c);
        if (out && jpeg8_run(j, data, start, (ptrdiff_t)size, out, threads) != 0) {
            free(out);
            out = NULL;
        }
    }
    free_jpeg(j);
    free(j);
    return out;
}

#ifndef JPEG8_RUN_NO_MAIN
static uint32_t fnv1a(const uint8_t *p, size_t n)
{
    uint32_t hash = 2166136261u;
    for (size_t i = 0; i < n; i++) hash = (hash ^ p[i]) * 16777619u;
    return hash;
}

int main(int argc, char **argv)
{
    jpeg8_init();
    int status = 0;
    for (int a = 1; a < argc; a++) {
        FILE *f = fopen(argv[a], "rb");
        if (!f) {
            perror(argv[a]);
            return 2;
        }
        fseek(f, 0, SEEK_END);
        long size = ftell(f);
        fseek(f, 0, SEEK_SET);
        uint8_t *data = malloc(size > 0 ? (size_t)size : 1);
        if (!data || fread(data, 1, (size_t)size, f) != (size_t)size) return 2;
        fclose(f);
        int w = 0, h = 0, c = 0, w2 = 0, h2 = 0, c2 = 0;
        uint8_t *one = jpeg8_decode(data, (size_t)size, 1, &w, &h, &c);
        uint8_t *two = jpeg8_decode(data, (size_t)size, 2, &w2, &h2, &c2);
        if (!one != !two || (one && memcmp(one, two, (size_t)w * h * c) != 0)) {
            printf("%s: one and two threads disagree\n", argv[a]);
            status = 1;
        } else if (one) {
            printf("%s: %dx%dx%d %08x\n", argv[a], w, h, c, fnv1a(one, (size_t)w * h * c));
        } else {
            printf("%s: declined\n", argv[a]);
        }
        free(one);
        free(two);
        free(data);
    }
    return status;
}
#endif

/* Cropped JPEG decode with libjpeg-turbo: only the rows and columns of a crop box are decoded.
 *
 * Why this exists: a RandomResizedCrop box covers about half of the image on average, yet every
 * Python JPEG wrapper (simplejpeg, Pillow, OpenCV, torchvision.io, imagecodecs, PyTurboJPEG with
 * libturbojpeg 2.x) decodes the whole image. libjpeg-turbo itself can do better, as NVIDIA DALI's CPU
 * `decoders.image_random_crop` does: jpeg_crop_scanline() skips the inverse DCT, upsampling and colour
 * conversion of the columns outside the box, jpeg_skip_scanlines() skips that work for the rows above
 * it, and the rows below it are never read. The measurement is in docs/benchmarks.md.
 *
 * One function, decode_crop(data, scale_denom, x0, y0, x1, y1) -> (bytearray, x, y, width, height):
 * decodes to RGB at 1/scale_denom size (a DCT-domain downscale, as simplejpeg's min_width) and
 * returns a region that contains the box [x0, x1) x [y0, y1) of the scaled image: rows y0..y1-1 and
 * the columns [x, x + width), widened to libjpeg's iMCU boundaries. The caller slices the box out.
 *
 * Exactness: the pixels inside the box are identical to a full decode (tested over many boxes and
 * all chroma subsamplings). libjpeg.txt warns that "fancy" h2v1/h2v2 chroma upsampling treats the
 * edges of a partial-width region as image edges, so the requested columns are widened by one pixel
 * on each side (where the image has one); those edge columns are outside the box.
 *
 * Strict like simplejpeg: any libjpeg warning (corrupt or truncated data) is an error, and so is data
 * that does not end with the end-of-image marker (a truncated file whose cut lies below the box would
 * otherwise pass); the Python side then falls back to its full decoder, which decides what is
 * undecodable. The GIL is released while libjpeg works.
 *
 * Built by setup.py as the top-level module `imagenet_ray_jpeg` (see imagenet_ray/data/decode.py for
 * why not a submodule of the package).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <setjmp.h>
#include <stdio.h>
#include <string.h>

#include <jpeglib.h>

#define STRINGIFY_(x) #x
#define STRINGIFY(x) STRINGIFY_(x)

static PyObject *JpegError;

struct strict_error_mgr {
    struct jpeg_error_mgr pub;
    jmp_buf jump;
    char message[JMSG_LENGTH_MAX];
};

static void strict_error_exit(j_common_ptr cinfo)
{
    struct strict_error_mgr *err = (struct strict_error_mgr *)cinfo->err;
    (*cinfo->err->format_message)(cinfo, err->message);
    longjmp(err->jump, 1);
}

static void strict_emit_message(j_common_ptr cinfo, int msg_level)
{
    if (msg_level < 0) /* a warning: corrupt data that libjpeg would paper over */
        strict_error_exit(cinfo);
}

static PyObject *decode_crop(PyObject *self, PyObject *args)
{
    Py_buffer src;
    int scale_denom;
    unsigned int x0, y0, x1, y1;
    if (!PyArg_ParseTuple(args, "y*iIIII", &src, &scale_denom, &x0, &y0, &x1, &y1))
        return NULL;
    if (scale_denom != 1 && scale_denom != 2 && scale_denom != 4 && scale_denom != 8) {
        PyBuffer_Release(&src);
        PyErr_Format(PyExc_ValueError, "scale_denom must be 1, 2, 4 or 8, not %d", scale_denom);
        return NULL;
    }

    /* The rows below the box are never read, so a truncated file could pass unnoticed: take only
     * data that ends with the end-of-image marker (anything else goes to the full decoder). */
    const unsigned char *bytes = (const unsigned char *)src.buf;
    if (src.len < 4 || bytes[src.len - 2] != 0xFF || bytes[src.len - 1] != 0xD9) {
        PyBuffer_Release(&src);
        PyErr_SetString(JpegError, "no end-of-image marker at the end of the data");
        return NULL;
    }

    struct jpeg_decompress_struct cinfo;
    struct strict_error_mgr jerr;
    /* volatile: read after a longjmp */
    PyObject *volatile out = NULL;
    PyThreadState *volatile thread_state = NULL;
    volatile int bad_box = 0;
    JDIMENSION xoffset = 0, crop_width = 0;

    cinfo.err = jpeg_std_error(&jerr.pub);
    jerr.pub.error_exit = strict_error_exit;
    jerr.pub.emit_message = strict_emit_message;
    jerr.message[0] = '\0';
    jpeg_create_decompress(&cinfo);

    if (setjmp(jerr.jump)) {
        if (thread_state != NULL)
            PyEval_RestoreThread(thread_state);
        jpeg_destroy_decompress(&cinfo);
        PyBuffer_Release(&src);
        Py_XDECREF(out);
        PyErr_Format(JpegError, "libjpeg: %s", jerr.message);
        return NULL;
    }

    thread_state = PyEval_SaveThread();
    jpeg_mem_src(&cinfo, (const unsigned char *)src.buf, (unsigned long)src.len);
    jpeg_read_header(&cinfo, TRUE);
    cinfo.out_color_space = JCS_RGB; /* also for grayscale input: libjpeg-turbo replicates the channel */
    cinfo.scale_num = 1;
    cinfo.scale_denom = (unsigned int)scale_denom;
    jpeg_start_decompress(&cinfo);

    const JDIMENSION full_width = cinfo.output_width, full_height = cinfo.output_height;
    if (!(x0 < x1 && x1 <= full_width && y0 < y1 && y1 <= full_height)) {
        bad_box = 1;
    } else {
        /* One spare column each side keeps fancy upsampling's edge handling off the box. */
        xoffset = x0 > 0 ? x0 - 1 : 0;
        crop_width = (x1 < full_width ? x1 + 1 : full_width) - xoffset;
        if (crop_width < full_width)
            jpeg_crop_scanline(&cinfo, &xoffset, &crop_width); /* moves xoffset left to an iMCU edge */
        else
            xoffset = 0;
        crop_width = cinfo.output_width;
        if (y0 > 0)
            jpeg_skip_scanlines(&cinfo, y0);
    }
    PyEval_RestoreThread(thread_state);
    thread_state = NULL;

    if (bad_box) {
        jpeg_destroy_decompress(&cinfo);
        PyBuffer_Release(&src);
        PyErr_Format(PyExc_ValueError, "crop box [%u, %u) x [%u, %u) is not inside the %ux%u image",
                     x0, x1, y0, y1, (unsigned int)full_width, (unsigned int)full_height);
        return NULL;
    }

    const JDIMENSION rows = y1 - y0;
    const size_t stride = (size_t)crop_width * 3;
    out = PyByteArray_FromStringAndSize(NULL, (Py_ssize_t)(stride * rows));
    if (out == NULL) {
        jpeg_destroy_decompress(&cinfo);
        PyBuffer_Release(&src);
        return NULL;
    }
    unsigned char *pixels = (unsigned char *)PyByteArray_AS_STRING(out);

    thread_state = PyEval_SaveThread();
    JDIMENSION done = 0;
    while (done < rows) {
        JSAMPROW row_pointers[16];
        JDIMENSION want = rows - done < 16 ? rows - done : 16;
        for (JDIMENSION i = 0; i < want; i++)
            row_pointers[i] = pixels + (done + i) * stride;
        JDIMENSION got = jpeg_read_scanlines(&cinfo, row_pointers, want);
        if (got == 0) { /* cannot happen with a memory source; never loop forever */
            strcpy(jerr.message, "decoder returned no rows");
            longjmp(jerr.jump, 1);
        }
        done += got;
    }
    /* The rows below the box are never decoded: abort rather than finish. */
    jpeg_abort_decompress(&cinfo);
    PyEval_RestoreThread(thread_state);
    thread_state = NULL;

    jpeg_destroy_decompress(&cinfo);
    PyBuffer_Release(&src);
    PyObject *result = Py_BuildValue("(OIIII)", out, (unsigned int)xoffset, y0, (unsigned int)crop_width, rows);
    Py_DECREF(out);
    return result;
}

static PyMethodDef methods[] = {
    {"decode_crop", decode_crop, METH_VARARGS,
     "decode_crop(data, scale_denom, x0, y0, x1, y1) -> (bytearray, x, y, width, height)\n\n"
     "RGB pixels of rows [y0, y1) and columns [x, x + width) (a superset of [x0, x1)) of the JPEG\n"
     "decoded at 1/scale_denom size. Raises JpegError for any corrupt or unsupported data."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "imagenet_ray_jpeg", "Cropped JPEG decode with libjpeg-turbo (see the C source).", -1,
    methods, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit_imagenet_ray_jpeg(void)
{
    PyObject *m = PyModule_Create(&module);
    if (m == NULL)
        return NULL;
    JpegError = PyErr_NewException("imagenet_ray_jpeg.JpegError", PyExc_ValueError, NULL);
    if (JpegError == NULL || PyModule_AddObject(m, "JpegError", JpegError) < 0) {
        Py_XDECREF(JpegError);
        Py_DECREF(m);
        return NULL;
    }
    PyModule_AddStringConstant(m, "LIBJPEG_TURBO_VERSION", STRINGIFY(LIBJPEG_TURBO_VERSION));
    PyModule_AddIntConstant(m, "JPEG_LIB_VERSION", JPEG_LIB_VERSION);
    return m;
}

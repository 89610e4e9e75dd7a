/*
 * pgferry.sync._copyjson: Electric insert messages from blocks of PostgreSQL COPY text, in C.
 *
 * Why C: a fresh shape's snapshot is COPY text turned into JSON messages, and in Python that conversion
 * (a split, a tuple and a %-format per row) cost ~5 us per row, twice PostgreSQL's own COPY, on the server's
 * one GIL. Here it is one pass over the bytes with the GIL released, so it runs beside compression and
 * HTTP serving. The output is byte for byte what pgferry.sync.copytext.MessageTemplate.exact gives (COPY
 * text decoded field by field, then json.dumps(..., separators=(",", ":"), ensure_ascii=False)); the
 * pure-Python path stays as the fallback and as the tests' reference.
 *
 * convert_block(block: bytes, parts: tuple[bytes, ...]) -> tuple[bytes, bytes]
 *   Returns the messages joined by commas (a shape log segment's plain form) and their lengths as native
 *   64-bit integers (array("q")): no Python object per row.
 *   block: whole COPY text lines, each ending in "\n", fields separated by "\t"; len(parts) - 1 fields.
 *   parts: the message template's fixed pieces: parts[0] before the first field, parts[i] between field i-1
 *          and field i, parts[-1] after the last. Each field becomes a JSON string ("..." with JSON escapes)
 *          or null when it is exactly \N (COPY's NULL; a value's own backslash is always written \\).
 *   Raises ValueError when a line has another number of fields.
 *
 * COPY TO writes \\ \b \f \n \r \t \v as escapes and every other byte as it is. JSON keeps the first six,
 * needs \u000b for \v, \" for a double quote and \u00XX for the raw control bytes COPY passes through.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <time.h>
#include <string.h>

typedef struct {
    char *data;
    Py_ssize_t size;
    Py_ssize_t capacity;
} Buffer;

static int buffer_reserve(Buffer *buffer, Py_ssize_t more) {
    if (buffer->size + more <= buffer->capacity) {
        return 0;
    }
    Py_ssize_t wanted = buffer->capacity * 2;
    if (wanted < buffer->size + more) {
        wanted = buffer->size + more;
    }
    char *grown = realloc(buffer->data, (size_t)wanted); /* not PyMem: a thread's buffers are freed at its exit */
    if (grown == NULL) {
        return -1;
    }
    buffer->data = grown;
    buffer->capacity = wanted;
    return 0;
}

static const char HEX[] = "0123456789abcdef";

/* One decoded byte written as JSON string content (json.dumps with ensure_ascii=False). */
static inline char *put_json_byte(char *out, unsigned char byte) {
    switch (byte) {
    case '"': *out++ = '\\'; *out++ = '"'; return out;
    case '\\': *out++ = '\\'; *out++ = '\\'; return out;
    case '\b': *out++ = '\\'; *out++ = 'b'; return out;
    case '\f': *out++ = '\\'; *out++ = 'f'; return out;
    case '\n': *out++ = '\\'; *out++ = 'n'; return out;
    case '\r': *out++ = '\\'; *out++ = 'r'; return out;
    case '\t': *out++ = '\\'; *out++ = 't'; return out;
    default:
        if (byte < 0x20) {
            *out++ = '\\'; *out++ = 'u'; *out++ = '0'; *out++ = '0';
            *out++ = HEX[byte >> 4]; *out++ = HEX[byte & 0xF];
            return out;
        }
        *out++ = (char)byte;
        return out;
    }
}

/* Bytes a field cannot copy as they are: the backslash (COPY's escapes), the double quote and the control bytes. */
static const unsigned char SPECIAL[256] = {
    [0 ... 0x1f] = 1,
    ['"'] = 1,
    ['\\'] = 1,
};

/* The byte a COPY escape stands for (pgferry.sync.copytext.decode_field: any other escaped byte is itself). */
static inline unsigned char copy_unescape(unsigned char code) {
    switch (code) {
    case 'b': return '\b';
    case 'f': return '\f';
    case 'n': return '\n';
    case 'r': return '\r';
    case 't': return '\t';
    case 'v': return '\v';
    default: return code;
    }
}

/* The JSON string content of one COPY field: COPY's escapes decoded, JSON's applied (json.dumps with
   ensure_ascii=False); with double_slash a "/" is written twice (a primary key value inside a row key). The runs of
   bytes that stay as they are, most of a value, are copied in one go. */
static char *put_content(char *out, const unsigned char *field, const unsigned char *end,
                         const unsigned char *special, int double_slash) {
    while (field < end) {
        const unsigned char *run = field;
        while (run < end && !special[*run]) {
            run++;
        }
        memcpy(out, field, (size_t)(run - field));
        out += run - field;
        field = run;
        if (field == end) {
            break;
        }
        unsigned char byte = *field++;
        if (byte == '\\' && field < end) { /* a lone backslash at the end stands for itself */
            byte = copy_unescape(*field++);
        }
        if (double_slash && byte == '/') {
            *out++ = '/';
            *out++ = '/';
        } else {
            out = put_json_byte(out, byte);
        }
    }
    return out;
}

/* Append one COPY field as a JSON value; the caller reserved 6 bytes per input byte plus 4. */
static char *put_field(char *out, const unsigned char *field, Py_ssize_t length) {
    if (length == 2 && field[0] == '\\' && field[1] == 'N') {
        memcpy(out, "null", 4);
        return out + 4;
    }
    *out++ = '"';
    out = put_content(out, field, field + length, SPECIAL, 0);
    *out++ = '"';
    return out;
}

/* The message template's fixed pieces, read from the parts tuple (borrowed: the tuple outlives every use), and
   where the row's key comes from: the first COPY field, or (key_head not empty) built here from the primary key's
   fields, so PostgreSQL does not concatenate it for every row. */
typedef struct {
    const char **data;
    Py_ssize_t *size;
    Py_ssize_t nfields; /* message fields: the key, then each value */
    Py_ssize_t fixed;
    const char *key_head; /* '"' and the JSON-escaped '"schema"."table"/' */
    Py_ssize_t key_head_size;
    Py_ssize_t *pk; /* the primary key's fields among the values (1-based: field 0 is the key) */
    Py_ssize_t npk;
} Template;

static int template_init(Template *template, PyObject *parts, PyObject *key_head, PyObject *pk) {
    Py_ssize_t nparts = PyTuple_GET_SIZE(parts);
    template->nfields = nparts - 1;
    template->fixed = 0;
    template->data = NULL;
    template->size = NULL;
    template->pk = NULL;
    template->npk = 0;
    template->key_head = PyBytes_AS_STRING(key_head);
    template->key_head_size = PyBytes_GET_SIZE(key_head);
    if (template->nfields < 1) {
        PyErr_SetString(PyExc_ValueError, "parts must hold at least two pieces");
        return -1;
    }
    template->data = PyMem_Malloc(sizeof(char *) * (size_t)nparts);
    template->size = PyMem_Malloc(sizeof(Py_ssize_t) * (size_t)nparts);
    template->npk = PyTuple_GET_SIZE(pk);
    template->pk = PyMem_Malloc(sizeof(Py_ssize_t) * (size_t)(template->npk + 1));
    if (template->data == NULL || template->size == NULL || template->pk == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    for (Py_ssize_t i = 0; i < nparts; i++) {
        PyObject *part = PyTuple_GET_ITEM(parts, i);
        if (!PyBytes_Check(part)) {
            PyErr_SetString(PyExc_TypeError, "parts must be bytes");
            return -1;
        }
        template->data[i] = PyBytes_AS_STRING(part);
        template->size[i] = PyBytes_GET_SIZE(part);
        template->fixed += template->size[i];
    }
    if (template->key_head_size && template->npk < 1) {
        PyErr_SetString(PyExc_ValueError, "a key built from columns needs the primary key's fields");
        return -1;
    }
    for (Py_ssize_t i = 0; i < template->npk; i++) {
        Py_ssize_t index = PyLong_AsSsize_t(PyTuple_GET_ITEM(pk, i));
        if (index == -1 && PyErr_Occurred()) {
            return -1;
        }
        if (index < 0 || index >= template->nfields - 1) {
            PyErr_SetString(PyExc_ValueError, "a primary key field is not among the values");
            return -1;
        }
        template->pk[i] = index + 1;
    }
    template->fixed += template->key_head_size + template->npk * 6 + 1;
    return 0;
}

static void template_free(Template *template) {
    PyMem_Free(template->data);
    PyMem_Free(template->size);
    PyMem_Free(template->pk);
}

/* Bytes a key part cannot copy as they are: those of SPECIAL, and the slash, which the key doubles. */
static const unsigned char KEY_SPECIAL[256] = {
    [0 ... 0x1f] = 1,
    ['"'] = 1,
    ['\\'] = 1,
    ['/'] = 1,
};

/* One primary key value inside the key (pgferry.sync.protocol.row_key: "value" with "/" doubled, or "_" for
   NULL), written as JSON string content: the key is a JSON string. */
static char *put_key_part(char *out, const unsigned char *field, Py_ssize_t length) {
    if (length == 2 && field[0] == '\\' && field[1] == 'N') {
        memcpy(out, "\\\"_\\\"", 5); /* \"_\" */
        return out + 5;
    }
    *out++ = '\\';
    *out++ = '"';
    out = put_content(out, field, field + length, KEY_SPECIAL, 1);
    *out++ = '\\';
    *out++ = '"';
    return out;
}

/* Converted messages: the plain segment (joined by commas) and each message's length as int64. */
typedef struct {
    Buffer plain;
    Buffer lengths;
    Buffer spans; /* the current line's fields: start, length */
    Py_ssize_t count;
    Py_ssize_t bad_count; /* fields found on a line with the wrong number; -1 when every line was right */
} Output;

/* Convert whole COPY lines; runs without the GIL. 0, or -1 out of memory, or -2 a line with the wrong number of
   fields (output->bad_count). */
static int convert_lines(const Template *template, const unsigned char *data, Py_ssize_t size, Output *output) {
    const Py_ssize_t nfields = template->nfields;
    const int key_built = template->key_head_size > 0;
    const Py_ssize_t first = key_built ? 1 : 0; /* the message field the first COPY field goes to */
    if (buffer_reserve(&output->spans, (Py_ssize_t)sizeof(Py_ssize_t) * 2 * (nfields + 1)) < 0) {
        return -1;
    }
    Py_ssize_t *spans = (Py_ssize_t *)output->spans.data;
    const unsigned char *position = data;
    const unsigned char *end = data + size;
    while (position < end) {
        const unsigned char *newline = memchr(position, '\n', (size_t)(end - position));
        if (newline == NULL) {
            newline = end; /* a last line without its newline: converted all the same */
        }
        Py_ssize_t line_length = newline - position;
        /* Worst case: every byte becomes \u00XX (twice when it is also part of the key), each field framed in
           quotes or written as null. */
        if (buffer_reserve(&output->plain, 12 * line_length + template->fixed + 4 * nfields + 1) < 0 ||
            buffer_reserve(&output->lengths, (Py_ssize_t)sizeof(int64_t)) < 0) {
            return -1;
        }
        /* The line's fields, in message order. */
        Py_ssize_t index = first;
        const unsigned char *field = position;
        for (;;) {
            const unsigned char *tab = memchr(field, '\t', (size_t)(newline - field));
            const unsigned char *field_end = tab ? tab : newline;
            if (index < nfields) {
                spans[2 * index] = field - data;
                spans[2 * index + 1] = field_end - field;
            }
            index++;
            if (tab == NULL) {
                break;
            }
            field = tab + 1;
        }
        if (index != nfields) {
            output->bad_count = index - first;
            return -2;
        }
        char *out = output->plain.data + output->plain.size;
        if (output->count) {
            *out++ = ',';
        }
        char *message = out;
        for (Py_ssize_t i = 0; i < nfields; i++) {
            memcpy(out, template->data[i], (size_t)template->size[i]);
            out += template->size[i];
            if (i == 0 && key_built) {
                memcpy(out, template->key_head, (size_t)template->key_head_size);
                out += template->key_head_size;
                for (Py_ssize_t k = 0; k < template->npk; k++) {
                    if (k) {
                        *out++ = '/';
                    }
                    Py_ssize_t at = template->pk[k];
                    out = put_key_part(out, data + spans[2 * at], spans[2 * at + 1]);
                }
                *out++ = '"';
            } else {
                out = put_field(out, data + spans[2 * i], spans[2 * i + 1]);
            }
        }
        memcpy(out, template->data[nfields], (size_t)template->size[nfields]);
        out += template->size[nfields];
        int64_t length = out - message;
        memcpy(output->lengths.data + output->lengths.size, &length, sizeof length);
        output->lengths.size += (Py_ssize_t)sizeof length;
        output->plain.size = out - output->plain.data;
        output->count++;
        position = newline + 1;
    }
    return 0;
}

/* (plain, lengths) as bytes, or NULL with the error set for a failed conversion. */
static PyObject *output_result(const Template *template, Output *output, int status) {
    if (status == -1) {
        return PyErr_NoMemory();
    }
    if (status == -2) {
        /* bad_count counts COPY fields: the values, and the key first unless it is built here. */
        Py_ssize_t found = output->bad_count - (template->key_head_size ? 0 : 1);
        return PyErr_Format(PyExc_ValueError, "a COPY line has %zd values, expected %zd", found, template->nfields - 1);
    }
    PyObject *plain = PyBytes_FromStringAndSize(output->plain.data, output->plain.size);
    PyObject *lengths = PyBytes_FromStringAndSize(output->lengths.data, output->lengths.size);
    PyObject *result = NULL;
    if (plain != NULL && lengths != NULL) {
        result = PyTuple_Pack(2, plain, lengths);
    }
    Py_XDECREF(plain);
    Py_XDECREF(lengths);
    return result;
}

/* The working buffers of one thread, kept between calls: a snapshot converts a block of ~1 MiB a hundred times per
   100,000 rows, and allocating them afresh each time cost more in page faults (fresh memory, zeroed by the kernel)
   than the conversion itself. They grow to the largest block the thread has seen and stay until it ends:
   a snapshot's reader is a thread of its own: the buffers are freed when it ends (a pthread key's destructor). */
typedef struct {
    Buffer block, plain, lengths, spans;
} Kept;

static pthread_key_t kept_key;

static void kept_free(void *pointer) {
    Kept *kept = pointer;
    free(kept->block.data);
    free(kept->plain.data);
    free(kept->lengths.data);
    free(kept->spans.data);
    free(kept);
}

/* This thread's buffers (created empty on first use); NULL only when out of memory. */
static Kept *kept_buffers(void) {
    Kept *kept = pthread_getspecific(kept_key);
    if (kept == NULL) {
        kept = calloc(1, sizeof(Kept));
        if (kept != NULL && pthread_setspecific(kept_key, kept) != 0) {
            free(kept);
            kept = NULL;
        }
    }
    return kept;
}

static void output_take(Output *output, Kept *kept) {
    Buffer empty = {NULL, 0, 0};
    output->plain = kept ? kept->plain : empty;
    output->lengths = kept ? kept->lengths : empty;
    output->spans = kept ? kept->spans : empty;
    output->plain.size = output->lengths.size = output->spans.size = 0;
    output->count = 0;
    output->bad_count = -1;
}

/* Hand the (possibly grown) buffers back to the thread, or free them when it has none. */
static void output_free(Output *output, Kept *kept) {
    if (kept != NULL) {
        kept->plain = output->plain;
        kept->lengths = output->lengths;
        kept->spans = output->spans;
    } else {
        free(output->plain.data);
        free(output->lengths.data);
        free(output->spans.data);
    }
}

static PyObject *convert_block(PyObject *module, PyObject *args) {
    (void)module;
    Py_buffer block;
    PyObject *parts, *key_head, *pk;
    if (!PyArg_ParseTuple(args, "y*O!O!O!:convert_block", &block, &PyTuple_Type, &parts, &PyBytes_Type, &key_head,
                          &PyTuple_Type, &pk)) {
        return NULL;
    }
    PyObject *result = NULL;
    Template template;
    Kept *kept = kept_buffers();
    Output output;
    output_take(&output, kept);
    if (template_init(&template, parts, key_head, pk) == 0) {
        int status;
        Py_BEGIN_ALLOW_THREADS
        status = buffer_reserve(&output.plain, block.len + block.len / 2 + 64);
        if (status == 0) {
            status = convert_lines(&template, block.buf, block.len, &output);
        }
        Py_END_ALLOW_THREADS
        result = output_result(&template, &output, status);
    }
    template_free(&template);
    output_free(&output, kept);
    PyBuffer_Release(&block);
    return result;
}

/* libpq's PQgetCopyData and PQfreemem, by address: the ones of the libpq psycopg loaded (this module does not
   link libpq, so it can never mix two builds of it on one connection). */
typedef int (*get_copy_data_fn)(void *conn, char **buffer, int async);
typedef void (*freemem_fn)(void *pointer);

static double monotonic_seconds(void) {
    struct timespec now;
    clock_gettime(CLOCK_MONOTONIC, &now);
    return (double)now.tv_sec + (double)now.tv_nsec / 1e9;
}

static PyObject *read_copy(PyObject *module, PyObject *args) {
    (void)module;
    unsigned long long get_copy_data_address, freemem_address, conn_address;
    PyObject *parts, *key_head, *pk;
    Py_ssize_t min_bytes;
    double max_seconds;
    if (!PyArg_ParseTuple(args, "KKKO!O!O!nd:read_copy", &get_copy_data_address, &freemem_address, &conn_address,
                          &PyTuple_Type, &parts, &PyBytes_Type, &key_head, &PyTuple_Type, &pk, &min_bytes,
                          &max_seconds)) {
        return NULL;
    }
    if (!get_copy_data_address || !freemem_address || !conn_address) {
        PyErr_SetString(PyExc_ValueError, "read_copy needs libpq's functions and an open connection");
        return NULL;
    }
    get_copy_data_fn get_copy_data = (get_copy_data_fn)(uintptr_t)get_copy_data_address;
    freemem_fn freemem = (freemem_fn)(uintptr_t)freemem_address;
    void *conn = (void *)(uintptr_t)conn_address;
    Template template;
    if (template_init(&template, parts, key_head, pk) < 0) {
        template_free(&template);
        return NULL;
    }
    Kept *kept = kept_buffers();
    Buffer empty = {NULL, 0, 0};
    Buffer block = kept ? kept->block : empty;
    block.size = 0;
    Output output;
    output_take(&output, kept);
    int status = 0, copy_status = 0, torn = 0;
    Py_BEGIN_ALLOW_THREADS
    double deadline = monotonic_seconds() + max_seconds;
    if (buffer_reserve(&block, min_bytes + (64 << 10)) < 0) {
        status = -1;
    }
    while (status == 0) {
        char *row = NULL;
        int length = get_copy_data(conn, &row, 0); /* blocks in libpq, without the GIL */
        if (length < 0) {
            copy_status = length; /* -1: the COPY ended; -2: an error, read by the caller from the connection */
            break;
        }
        if (length > 0) {
            if (row[length - 1] != '\n') {
                torn = 1; /* COPY text sends one whole line per message */
            }
            if (buffer_reserve(&block, length) < 0) {
                status = -1;
            } else {
                memcpy(block.data + block.size, row, (size_t)length);
                block.size += length;
            }
        }
        if (row != NULL) {
            freemem(row);
        }
        /* Back to the caller with a whole block, or after max_seconds of rows (it watches for a stalled COPY). */
        if (torn || block.size >= min_bytes || monotonic_seconds() >= deadline) {
            break;
        }
    }
    if (status == 0 && !torn) {
        status = buffer_reserve(&output.plain, block.size + block.size / 2 + 64);
        if (status == 0) {
            status = convert_lines(&template, (const unsigned char *)block.data, block.size, &output);
        }
    }
    Py_END_ALLOW_THREADS
    PyObject *result = NULL;
    if (torn) {
        PyErr_SetString(PyExc_ValueError, "a COPY message did not hold one whole line");
    } else {
        PyObject *converted = output_result(&template, &output, status);
        if (converted != NULL) {
            result = Py_BuildValue("(OOi)", PyTuple_GET_ITEM(converted, 0), PyTuple_GET_ITEM(converted, 1),
                                   copy_status);
            Py_DECREF(converted);
        }
    }
    if (kept != NULL) {
        kept->block = block;
    } else {
        free(block.data);
    }
    output_free(&output, kept);
    template_free(&template);
    return result;
}

static PyMethodDef methods[] = {
    {"read_copy", read_copy, METH_VARARGS,
     "read_copy(get_copy_data, freemem, conn, parts, min_bytes, max_seconds) -> (plain, lengths, status): COPY\n"
     "rows read with libpq (functions and PGconn by address) until min_bytes of them, max_seconds or the end,\n"
     "converted as convert_block does;\n"
     "status 0 (more follows), -1 (the COPY ended) or -2 (an error: see the connection)."},
    {"convert_block", convert_block, METH_VARARGS,
     "convert_block(block, parts) -> (plain, lengths): Electric insert messages from whole COPY text lines,\n"
     "joined by commas, and their lengths as native 64-bit integers."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module_definition = {
    PyModuleDef_HEAD_INIT, "pgferry.sync._copyjson",
    "Electric insert messages from PostgreSQL COPY text, in C (see pgferry.sync.copytext).", -1, methods,
    NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__copyjson(void) {
    if (pthread_key_create(&kept_key, kept_free) != 0) {
        return PyErr_NoMemory();
    }
    return PyModule_Create(&module_definition);
}

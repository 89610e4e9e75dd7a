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
#include <stdint.h>
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
    char *grown = PyMem_RawRealloc(buffer->data, (size_t)wanted);
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

/* Append one COPY field as a JSON value; the caller reserved 6 bytes per input byte plus 4. */
static char *put_field(char *out, const unsigned char *field, Py_ssize_t length) {
    if (length == 2 && field[0] == '\\' && field[1] == 'N') {
        memcpy(out, "null", 4);
        return out + 4;
    }
    *out++ = '"';
    const unsigned char *end = field + length;
    while (field < end) {
        /* Copy the run of bytes that stay as they are in one go: most of a value. */
        const unsigned char *run = field;
        while (run < end && !SPECIAL[*run]) {
            run++;
        }
        memcpy(out, field, (size_t)(run - field));
        out += run - field;
        field = run;
        if (field == end) {
            break;
        }
        unsigned char byte = *field++;
        if (byte == '\\') {
            if (field == end) { /* a lone backslash at the end stands for itself */
                out = put_json_byte(out, '\\');
                continue;
            }
            out = put_json_byte(out, copy_unescape(*field++));
        } else if (byte == '"' || byte < 0x20) {
            out = put_json_byte(out, byte);
        } else {
            *out++ = (char)byte;
        }
    }
    *out++ = '"';
    return out;
}

static PyObject *convert_block(PyObject *module, PyObject *args) {
    Py_buffer block;
    PyObject *parts;
    if (!PyArg_ParseTuple(args, "y*O!:convert_block", &block, &PyTuple_Type, &parts)) {
        return NULL;
    }
    PyObject *result = NULL;
    PyObject *lengths = NULL;
    Buffer buffer = {NULL, 0, 0};
    Py_ssize_t nparts = PyTuple_GET_SIZE(parts);
    Py_ssize_t nfields = nparts - 1;
    const char **part_data = NULL;
    Py_ssize_t *part_size = NULL;
    Py_ssize_t fixed = 0;
    if (nfields < 1) {
        PyErr_SetString(PyExc_ValueError, "parts must hold at least two pieces");
        goto done;
    }
    part_data = PyMem_Malloc(sizeof(char *) * (size_t)nparts);
    part_size = PyMem_Malloc(sizeof(Py_ssize_t) * (size_t)nparts);
    if (part_data == NULL || part_size == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    for (Py_ssize_t i = 0; i < nparts; i++) {
        PyObject *part = PyTuple_GET_ITEM(parts, i);
        if (!PyBytes_Check(part)) {
            PyErr_SetString(PyExc_TypeError, "parts must be bytes");
            goto done;
        }
        part_data[i] = PyBytes_AS_STRING(part);
        part_size[i] = PyBytes_GET_SIZE(part);
        fixed += part_size[i];
    }

    const unsigned char *data = block.buf;
    Py_ssize_t size = block.len;
    Py_ssize_t lines = 0;
    for (const unsigned char *p = data; (p = memchr(p, '\n', (size_t)(data + size - p))) != NULL; p++) {
        lines++;
    }
    /* + a last line without its newline */
    lengths = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)sizeof(int64_t) * (lines + 1));
    if (lengths == NULL) {
        goto done;
    }
    int64_t *message_lengths = (int64_t *)PyBytes_AS_STRING(lengths);
    if (buffer_reserve(&buffer, size + size / 4 + lines * (fixed + 2 * nfields) + 64) < 0) {
        PyErr_NoMemory();
        goto done;
    }

    Py_ssize_t bad_line = -1, bad_count = 0;
    int out_of_memory = 0;
    Py_ssize_t line_index = 0;
    Py_BEGIN_ALLOW_THREADS
    const unsigned char *position = data;
    const unsigned char *end = data + size;
    while (position < end) {
        const unsigned char *newline = memchr(position, '\n', (size_t)(end - position));
        if (newline == NULL) {
            newline = end; /* a last line without its newline: converted all the same */
        }
        Py_ssize_t line_length = newline - position;
        /* Worst case: every byte becomes \u00XX, each field framed in quotes or written as null. */
        if (buffer_reserve(&buffer, 6 * line_length + fixed + 4 * nfields + 1) < 0) {
            out_of_memory = 1;
            break;
        }
        char *out = buffer.data + buffer.size;
        if (line_index) {
            *out++ = ',';
        }
        char *message = out;
        const unsigned char *field = position;
        Py_ssize_t index = 0;
        for (;;) {
            const unsigned char *tab = memchr(field, '\t', (size_t)(newline - field));
            const unsigned char *field_end = tab ? tab : newline;
            if (index < nfields) {
                memcpy(out, part_data[index], (size_t)part_size[index]);
                out += part_size[index];
                out = put_field(out, field, field_end - field);
            }
            index++;
            if (tab == NULL) {
                break;
            }
            field = tab + 1;
        }
        if (index != nfields) {
            bad_line = line_index;
            bad_count = index;
            break;
        }
        memcpy(out, part_data[nfields], (size_t)part_size[nfields]);
        out += part_size[nfields];
        message_lengths[line_index] = out - message;
        buffer.size = out - buffer.data;
        line_index++;
        position = newline + 1;
    }
    Py_END_ALLOW_THREADS

    if (out_of_memory) {
        PyErr_NoMemory();
        goto done;
    }
    if (bad_line >= 0) {
        PyErr_Format(PyExc_ValueError, "a COPY line has %zd values, expected %zd", bad_count - 1, nfields - 1);
        goto done;
    }
    if (_PyBytes_Resize(&lengths, (Py_ssize_t)sizeof(int64_t) * line_index) < 0) {
        goto done; /* lengths was freed and set to NULL */
    }
    PyObject *plain = PyBytes_FromStringAndSize(buffer.data, buffer.size);
    if (plain == NULL) {
        goto done;
    }
    result = PyTuple_Pack(2, plain, lengths);
    Py_DECREF(plain);

done:
    Py_XDECREF(lengths);
    PyMem_RawFree(buffer.data);
    PyMem_Free(part_data);
    PyMem_Free(part_size);
    PyBuffer_Release(&block);
    return result;
}

static PyMethodDef methods[] = {
    {"convert_block", convert_block, METH_VARARGS,
     "convert_block(block, parts) -> (plain, lengths): Electric insert messages from whole COPY text lines,\n"
     "joined by commas, and their lengths as native 64-bit integers."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module_definition = {
    PyModuleDef_HEAD_INIT, "pgferry.sync._copyjson",
    "Electric insert messages from PostgreSQL COPY text, in C (see pgferry.sync.copytext).", -1, methods,
};

PyMODINIT_FUNC PyInit__copyjson(void) { return PyModule_Create(&module_definition); }

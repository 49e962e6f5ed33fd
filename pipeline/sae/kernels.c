/* C kernels of the k-sparse SAE step on CPU (pipeline/sae/native.py builds and loads this
   file; pipeline/sae/sparse.py calls them). Each splits its work across OpenMP threads: built
   with -fopenmp and loaded into a process that has torch's libgomp, these are torch's own
   intra-op threads, already awake after the encoder's matmul.

   topk_rows: the k largest entries of each row of pre + bias. Per row, three passes over data
   that stays in cache:
   1. the maxima of 2k equal chunks of the row; the k-th largest of them is a lower bound on the
      row's k-th largest entry (k chunks hold an entry at least that large);
   2. the entries not below that bound are the candidates (about 1.5k of them for the rows of an
      SAE's encoder), gathered with AVX-512 compress stores where the CPU has them;
   3. a quickselect keeps the k largest candidates.
   NaN counts as larger than every number, as in torch.topk. Rows where most entries are -inf
   (AuxK masks the live latents so) take their finite entries and pad with -inf ones.

   outer_sum: out[latents[e]] += g[e] * m[rows[e]] over all entries, by latent after a counting
   sort (each output row is written once, by one thread).

   entry_dots: dot(g[b], w[latents[e]]) for each entry e of each row b. */

#include <float.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

static inline void swap_entries(float *key, int32_t *id, int64_t i, int64_t j) {
    float t = key[i]; key[i] = key[j]; key[j] = t;
    int32_t u = id[i]; id[i] = id[j]; id[j] = u;
}

/* Reorder key[0, n) (no NaN) and id alike so that the k largest keys come first. */
static void select_top(float *key, int32_t *id, int64_t n, int64_t k) {
    int64_t lo = 0, hi = n;  /* [0, lo) >= [lo, hi) >= [hi, n), and lo <= k <= hi */
    while (lo < k && k < hi) {
        float a = key[lo], b = key[lo + (hi - lo) / 2], c = key[hi - 1];
        float small = a < b ? a : b, large = a < b ? b : a;
        float pivot = c < small ? small : (c > large ? large : c);  /* median of three */
        int64_t gt = lo, i = lo, lt = hi;  /* [lo, gt) > pivot, [gt, i) == pivot, [lt, hi) < */
        while (i < lt) {
            if (key[i] > pivot) swap_entries(key, id, i++, gt++);
            else if (key[i] < pivot) swap_entries(key, id, i, --lt);
            else i++;
        }
        if (k < gt) hi = gt;
        else if (k <= lt) return;
        else lo = lt;
    }
}

static float chunk_max(const float *p, const float *bias, int64_t lo, int64_t hi) {
    float m = -INFINITY;
    int64_t j = lo;
#ifdef __AVX2__
    __m256 mv = _mm256_set1_ps(-INFINITY);
    for (; j + 8 <= hi; j += 8) {
        __m256 s = _mm256_loadu_ps(p + j);
        if (bias) s = _mm256_add_ps(s, _mm256_loadu_ps(bias + j));
        mv = _mm256_max_ps(s, mv);  /* a NaN in s gives mv: NaN never raises the bound */
    }
    float lane[8];
    _mm256_storeu_ps(lane, mv);
    for (int t = 0; t < 8; t++) m = lane[t] > m ? lane[t] : m;
#endif
    for (; j < hi; j++) {
        float v = bias ? p[j] + bias[j] : p[j];
        m = v > m ? v : m;
    }
    return m;
}

typedef struct { float *key; int32_t *id; int64_t cap; } Scratch;

/* Room for n + 16 entries (a compress store writes 16); 0, or -1 when out of memory. */
static int reserve(Scratch *s, int64_t n) {
    if (n + 16 <= s->cap) return 0;
    int64_t cap = 2 * (n + 16);
    float *key = realloc(s->key, (size_t)cap * sizeof(float));
    if (key) s->key = key;
    int32_t *id = realloc(s->id, (size_t)cap * sizeof(int32_t));
    if (id) s->id = id;
    if (!key || !id) return -1;
    s->cap = cap;
    return 0;
}

/* Gather (entry, index) of row p's entries not below thr into the scratch; returns how many,
   or -1 when out of memory. */
static int64_t candidates(const float *p, const float *bias, int64_t d, float thr, Scratch *s) {
    int64_t n = 0, j = 0;
#ifdef __AVX512F__
    const __m512 t16 = _mm512_set1_ps(thr);
    const __m512i iota = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    for (; j + 16 <= d; j += 16) {
        if (reserve(s, n)) return -1;
        __m512 v = _mm512_loadu_ps(p + j);
        if (bias) v = _mm512_add_ps(v, _mm512_loadu_ps(bias + j));
        __mmask16 m = _mm512_cmp_ps_mask(v, t16, _CMP_NLT_UQ);  /* not below, or NaN */
        _mm512_storeu_ps(s->key + n, _mm512_maskz_compress_ps(m, v));
        _mm512_storeu_si512(s->id + n, _mm512_maskz_compress_epi32(
            m, _mm512_add_epi32(iota, _mm512_set1_epi32((int32_t)j))));
        n += __builtin_popcount(m);
    }
#elif defined(__AVX2__)
    const __m256 t8 = _mm256_set1_ps(thr);
    for (; j + 8 <= d; j += 8) {
        __m256 v = _mm256_loadu_ps(p + j);
        if (bias) v = _mm256_add_ps(v, _mm256_loadu_ps(bias + j));
        int m = _mm256_movemask_ps(_mm256_cmp_ps(v, t8, _CMP_NLT_UQ));
        if (m) {
            if (reserve(s, n)) return -1;
            float lane[8];
            _mm256_storeu_ps(lane, v);
            for (; m; m &= m - 1) {
                int t = __builtin_ctz(m);
                s->key[n] = lane[t];
                s->id[n++] = (int32_t)(j + t);
            }
        }
    }
#endif
    for (; j < d; j++) {
        float v = bias ? p[j] + bias[j] : p[j];
        if (!(v < thr)) {
            if (reserve(s, n)) return -1;
            s->key[n] = v;
            s->id[n++] = (int32_t)j;
        }
    }
    for (int64_t i = 0; i < n; i++) s->key[i] = s->key[i] != s->key[i] ? INFINITY : s->key[i];
    return n;
}

/* Each row of pre ([rows, d], row-major) plus bias ([d], or NULL for none): the k largest
   entries (1 <= k <= d < 2^31), unordered, as values into vals[r * k ...] and column indices
   into idx[r * k ...]. Returns 0, or -1 when out of memory. */
int topk_rows(const float *pre, const float *bias, int64_t d, int64_t k, int64_t rows,
              float *vals, int64_t *idx) {
    int64_t chunks = 2 * k <= d ? 2 * k : k;
    int status = 0;
#pragma omp parallel reduction(| : status)
    {
        Scratch s = {NULL, NULL, 0};
        status = reserve(&s, 2 * chunks);
#pragma omp for schedule(static)
        for (int64_t r = 0; r < rows; r++) {
            if (status) continue;
            const float *p = pre + r * d;
            for (int64_t c = 0; c < chunks; c++) {
                s.key[c] = chunk_max(p, bias, c * d / chunks, (c + 1) * d / chunks);  /* no NaN */
                s.id[c] = 0;
            }
            select_top(s.key, s.id, chunks, k);
            float thr = INFINITY;
            for (int64_t c = 0; c < k; c++) thr = s.key[c] < thr ? s.key[c] : thr;
            /* A bound of -inf (rows mostly -inf: AuxK's live latents) would take every entry:
               take the others, then as many -inf entries as the k need. */
            int64_t n = candidates(p, bias, d, thr == -INFINITY ? -FLT_MAX : thr, &s);
            for (int64_t j = 0; n >= 0 && n < k && j < d; j++) {
                if ((bias ? p[j] + bias[j] : p[j]) != -INFINITY) continue;
                if (reserve(&s, n)) { n = -1; break; }
                s.key[n] = -INFINITY;
                s.id[n++] = (int32_t)j;
            }
            if (n < 0) { status = -1; continue; }
            select_top(s.key, s.id, n, k);
            for (int64_t i = 0; i < k; i++) {
                int32_t j = s.id[i];
                vals[r * k + i] = bias ? p[j] + bias[j] : p[j];
                idx[r * k + i] = j;
            }
        }
        free(s.key);
        free(s.id);
    }
    return status;
}

/* out ([d_sae, width]) = sum over entries e < n of g[e] * m[rows[e]] into row latents[e]
   (m: [n_rows, width]). Returns 0; -1 when out of memory; -2 when a latent is outside
   [0, d_sae) or a row outside [0, n_rows) (out is then left unwritten). */
int outer_sum(const float *g, const int64_t *latents, const int64_t *rows, int64_t n,
              const float *m, int64_t n_rows, int64_t width, int64_t d_sae, float *out) {
    int64_t *start = calloc((size_t)d_sae + 1, sizeof(int64_t));
    int64_t *order = malloc((size_t)(n ? n : 1) * sizeof(int64_t));
    if (!start || !order) { free(start); free(order); return -1; }
    int status = 0;
    for (int64_t e = 0; e < n; e++) {
        if (latents[e] < 0 || latents[e] >= d_sae || rows[e] < 0 || rows[e] >= n_rows) {
            status = -2;
            break;
        }
        start[latents[e] + 1]++;
    }
    if (!status) {
        for (int64_t l = 0; l < d_sae; l++) start[l + 1] += start[l];
        for (int64_t e = 0; e < n; e++) order[start[latents[e]]++] = e;  /* start[l]: end of l */
#pragma omp parallel for schedule(dynamic, 256)
        for (int64_t l = 0; l < d_sae; l++) {
            float *o = out + l * width;
            int64_t q = l ? start[l - 1] : 0;
            if (q == start[l]) {
                memset(o, 0, (size_t)width * sizeof(float));
                continue;
            }
            const float a0 = g[order[q]];
            const float *row0 = m + rows[order[q]] * width;
            for (int64_t j = 0; j < width; j++) o[j] = a0 * row0[j];  /* no zero fill first */
            for (q++; q < start[l]; q++) {
                const float a = g[order[q]];
                const float *row = m + rows[order[q]] * width;
                for (int64_t j = 0; j < width; j++) o[j] += a * row[j];
            }
        }
    }
    free(start);
    free(order);
    return status;
}

/* dots[e] = dot(g[b], w[latents[e]]) for the entries e of each row b, offsets[b] to
   offsets[b + 1] (n for the last row); g: [rows, width], w: [n_latents, width]. Returns 0, or
   -2 when an offset or a latent is out of range (dots is then not fully written). */
int entry_dots(const float *g, const int64_t *latents, const int64_t *offsets, int64_t rows,
               int64_t n, const float *w, int64_t n_latents, int64_t width, float *dots) {
    for (int64_t b = 0; b < rows; b++) {
        int64_t hi = b + 1 < rows ? offsets[b + 1] : n;
        if (offsets[b] < 0 || offsets[b] > hi || hi > n) return -2;
    }
    for (int64_t e = 0; e < n; e++)
        if (latents[e] < 0 || latents[e] >= n_latents) return -2;
#pragma omp parallel for schedule(static)
    for (int64_t b = 0; b < rows; b++) {
        const float *gb = g + b * width;
        for (int64_t e = offsets[b], hi = b + 1 < rows ? offsets[b + 1] : n; e < hi; e++) {
            const float *wl = w + latents[e] * width;
            float s = 0.f;
#pragma omp simd reduction(+ : s)
            for (int64_t j = 0; j < width; j++) s += gb[j] * wl[j];
            dots[e] = s;
        }
    }
    return 0;
}

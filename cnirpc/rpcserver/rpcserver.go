// Package rpcserver serves the cnirpc protocol for overlayd: the HTTP
// handler of its operations, the Unix socket it listens on, and the
// server that bounds what the socket's clients can hold (Server). The
// protocol's types and the plugin's client are in cnirpc, which does not
// link net/http.
package rpcserver

import (
	"github.com/overlaynet/overlay/cnirpc"

	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"time"
)

// maxRequestBytes bounds a request body; a real one is about 100 bytes,
// and endpoint labels add at most overlay.MaxEndpointLabelBytes and their
// quoting.
const maxRequestBytes = 64 << 10

// maxGCRequestBytes bounds a GC request: it lists every attachment of
// the network on the host, about 100 bytes each.
const maxGCRequestBytes = 16 << 20

// Handler serves the protocol's operations. Its methods may be called
// concurrently and block while they talk to the store. An error that is
// an *cnirpc.Error is passed to the plugin as it is; any other becomes
// cnirpc.CodeInternal.
type Handler interface {
	// Add allocates (or returns the existing) address of the container
	// interface. The allocation needs not be durable before Flush.
	Add(ctx context.Context, r cnirpc.Request) (cnirpc.Attachment, error)
	// Flush returns once every allocation of network made so far is
	// durable. The answer to an ADD is sent after it, or, for an Early
	// request, its outcome follows the answer.
	Flush(ctx context.Context, network string) error
	// Del releases the container interface's address; one that holds
	// none is not an error.
	Del(ctx context.Context, r cnirpc.Request) error
	// Check returns the container interface's attachment, or an error
	// when it holds no address.
	Check(ctx context.Context, r cnirpc.Request) (cnirpc.Attachment, error)
	// Status reports whether the network can serve an ADD.
	Status(ctx context.Context, network string) (cnirpc.Status, error)
	// GC releases the addresses on this host that no valid attachment
	// holds, and returns the attachments it released.
	GC(ctx context.Context, r cnirpc.GCRequest) (cnirpc.GCResponse, error)
}

// ops are the operations of the protocol, as Observe names them; any
// other request path is "other".
var ops = [...]string{"add", "check", "del", "gc", "status"}

// Outcome is how one request to the socket ended.
type Outcome struct {
	// Op is the request's operation: "add", "check", "del", "gc",
	// "status", or "other" for any other path, so that the set of values
	// is bounded whatever path a client sends.
	Op string
	// Result is "ok", or the kind of the error the request ended with
	// (see ResultOf); for a path or method the protocol does not have,
	// "bad_request".
	Result string
	// Answer is how long the request took to its answer: for an early
	// ADD the early answer, for every other request the whole of it.
	Answer time.Duration
	// Confirmation is, for an early ADD, how long it took to its
	// confirmation (the allocation durable, or the error that it is
	// not); 0 for every other request.
	Confirmation time.Duration
}

// Observe is told the outcome of each request once it is complete. For an
// early ADD, the result is the confirmation's: an ADD whose allocation
// failed to reach the disk after its early answer counts as the error it
// was, not as the success its answer carried. It is called from the
// request's goroutine and must not block.
type Observe func(Outcome)

// NewHandler returns the HTTP handler of the protocol over h.
func NewHandler(h Handler, log *slog.Logger) http.Handler { return newMux(h, log) }

// Observed returns next, a handler of NewHandler's or one in front of
// it, telling observe the outcome of every request.
func Observed(next http.Handler, observe Observe) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		start := time.Now()
		ow := &outcomeWriter{ResponseWriter: w, result: "ok"}
		next.ServeHTTP(ow, r)
		o := Outcome{Op: opOf(r.URL.Path), Result: ow.result, Answer: time.Since(start)}
		if !ow.answered.IsZero() {
			o.Answer, o.Confirmation = ow.answered.Sub(start), o.Answer
		}
		if !ow.protocol && ow.status >= 400 {
			o.Result = "bad_request" // the mux's 404 or 405
		}
		observe(o)
	})
}

// opOf returns the operation of a request path, or "other".
func opOf(path string) string {
	if op, ok := strings.CutPrefix(path, "/"+cnirpc.Version+"/"); ok && slices.Contains(ops[:], op) {
		return op
	}
	return "other"
}

// ResultOf names the kind of error code carries, for Outcome.Result:
// "ok" for 0, and for the codes this protocol uses "unknown_container"
// (3), "invalid_environment" (4), "decoding_failure" (6),
// "invalid_network" (7), "unsupported_field" (2), "try_again_later"
// (11), "no_address" (100) and "internal" (999 and any other).
func ResultOf(code uint) string {
	switch code {
	case 0:
		return "ok"
	case cnirpc.CodeUnsupportedField:
		return "unsupported_field"
	case cnirpc.CodeUnknownContainer:
		return "unknown_container"
	case cnirpc.CodeInvalidEnvironment:
		return "invalid_environment"
	case cnirpc.CodeDecodingFailure:
		return "decoding_failure"
	case cnirpc.CodeInvalidNetwork:
		return "invalid_network"
	case cnirpc.CodeTryAgainLater:
		return "try_again_later"
	case cnirpc.CodeNoAddress:
		return "no_address"
	}
	return "internal"
}

// outcomeWriter records the outcome of a request for Observe.
type outcomeWriter struct {
	http.ResponseWriter
	status   int
	result   string
	protocol bool      // the result was set by the protocol, not the mux
	answered time.Time // when an early ADD's answer was flushed, or zero
}

func (w *outcomeWriter) WriteHeader(code int) {
	w.status = code
	w.ResponseWriter.WriteHeader(code)
}

// Unwrap lets http.ResponseController reach the server's writer, so that
// an early ADD answer is flushed before its confirmation.
func (w *outcomeWriter) Unwrap() http.ResponseWriter { return w.ResponseWriter }

// setResult records e (nil for success) as the result of the request w
// answers, when it is observed.
func setResult(w http.ResponseWriter, e *cnirpc.Error) {
	if ow, ok := w.(*outcomeWriter); ok {
		ow.protocol = true
		if e != nil {
			ow.result = ResultOf(e.Code)
		}
	}
}

// setAnswered records that the early answer of the ADD w answers was
// sent, and when.
func setAnswered(w http.ResponseWriter) {
	if ow, ok := w.(*outcomeWriter); ok {
		ow.answered = time.Now()
	}
}

func newMux(h Handler, log *slog.Logger) *http.ServeMux {
	mux := http.NewServeMux()
	mux.HandleFunc("POST /"+cnirpc.Version+"/add", func(w http.ResponseWriter, r *http.Request) {
		serveAdd(w, r, log, h)
	})
	mux.HandleFunc("POST /"+cnirpc.Version+"/check", func(w http.ResponseWriter, r *http.Request) {
		serve(w, r, log, "check", maxRequestBytes, h.Check)
	})
	mux.HandleFunc("POST /"+cnirpc.Version+"/del", func(w http.ResponseWriter, r *http.Request) {
		serve(w, r, log, "del", maxRequestBytes, func(ctx context.Context, req cnirpc.Request) (struct{}, error) {
			return struct{}{}, h.Del(ctx, req)
		})
	})
	mux.HandleFunc("POST /"+cnirpc.Version+"/gc", func(w http.ResponseWriter, r *http.Request) {
		serve(w, r, log, "gc", maxGCRequestBytes, h.GC)
	})
	mux.HandleFunc("GET /"+cnirpc.Version+"/status", func(w http.ResponseWriter, r *http.Request) {
		network := r.URL.Query().Get("network")
		if network == "" {
			writeError(w, log, "status", cnirpc.Errorf(cnirpc.CodeInvalidNetwork, "status: no network given"))
			return
		}
		st, err := h.Status(r.Context(), network)
		if err != nil {
			writeError(w, log, "status", err)
			return
		}
		writeJSON(w, http.StatusOK, st)
	})
	return mux
}

// decode reads a request of at most limit bytes and validates it; on
// failure it writes the error and returns false.
func decode[Req interface{ Validate() error }](w http.ResponseWriter, r *http.Request, log *slog.Logger, op string, limit int64) (Req, bool) {
	var req Req
	dec := json.NewDecoder(io.LimitReader(r.Body, limit))
	if err := dec.Decode(&req); err != nil {
		writeError(w, log, op, cnirpc.Errorf(cnirpc.CodeDecodingFailure, "%s: decode request: %v", op, err))
		return req, false
	}
	if err := req.Validate(); err != nil {
		writeError(w, log, op, err)
		return req, false
	}
	return req, true
}

// serveAdd answers an ADD once the allocation is durable, or, for an
// Early request, at once and then with a cnirpc.Confirmation once it is.
func serveAdd(w http.ResponseWriter, r *http.Request, log *slog.Logger, h Handler) {
	req, ok := decode[cnirpc.Request](w, r, log, "add", maxRequestBytes)
	if !ok {
		return
	}
	att, err := h.Add(r.Context(), req)
	if err != nil {
		writeError(w, log, "add", err)
		return
	}
	if !req.Early {
		if err := h.Flush(r.Context(), req.Network); err != nil {
			writeError(w, log, "add", err)
			return
		}
		writeJSON(w, http.StatusOK, att)
		return
	}
	att.Confirm = true
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(http.StatusOK)
	enc := json.NewEncoder(w)
	_ = enc.Encode(att)
	_ = http.NewResponseController(w).Flush()
	setAnswered(w)
	conf := cnirpc.Confirmation{Durable: true}
	setResult(w, nil)
	if err := h.Flush(r.Context(), req.Network); err != nil {
		conf = cnirpc.Confirmation{Err: asError("add", err)}
		setResult(w, conf.Err)
		log.Warn("cni request failed", "op", "add", "code", conf.Err.Code, "err", conf.Err.Error())
	}
	_ = enc.Encode(conf)
}

// serve decodes a request of at most limit bytes, validates it, calls fn
// and writes its answer or its error.
func serve[Req interface{ Validate() error }, Resp any](w http.ResponseWriter, r *http.Request, log *slog.Logger, op string, limit int64, fn func(context.Context, Req) (Resp, error)) {
	req, ok := decode[Req](w, r, log, op, limit)
	if !ok {
		return
	}
	out, err := fn(r.Context(), req)
	if err != nil {
		writeError(w, log, op, err)
		return
	}
	writeJSON(w, http.StatusOK, out)
}

// asError is err as the protocol carries it: an *cnirpc.Error as it is,
// anything else as CodeInternal.
func asError(op string, err error) *cnirpc.Error {
	var e *cnirpc.Error
	if !errors.As(err, &e) {
		e = &cnirpc.Error{Code: cnirpc.CodeInternal, Msg: op + " failed", Details: err.Error()}
	}
	return e
}

// statusOf returns the HTTP status that carries e.
func statusOf(e *cnirpc.Error) int {
	switch e.Code {
	case cnirpc.CodeDecodingFailure, cnirpc.CodeInvalidEnvironment, cnirpc.CodeInvalidNetwork, cnirpc.CodeUnsupportedField:
		return http.StatusBadRequest
	case cnirpc.CodeUnknownContainer:
		return http.StatusNotFound
	case cnirpc.CodeTryAgainLater, cnirpc.CodeNoAddress:
		return http.StatusServiceUnavailable
	}
	return http.StatusInternalServerError
}

func writeError(w http.ResponseWriter, log *slog.Logger, op string, err error) {
	e := asError(op, err)
	log.Warn("cni request failed", "op", op, "code", e.Code, "err", e.Error())
	setResult(w, e)
	writeJSON(w, statusOf(e), e)
}

func writeJSON(w http.ResponseWriter, status int, v any) {
	if status == http.StatusOK {
		setResult(w, nil)
	}
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	_ = json.NewEncoder(w).Encode(v)
}

// Listen creates the Unix socket at path, readable and writable by its
// owner only (root, for overlayd), in a directory of mode 0700. A stale
// socket left by a crashed overlayd is replaced; a live one is an error.
func Listen(path string) (net.Listener, error) {
	// A directory that already exists is left as it is: --socket may
	// point into a shared one. Between the socket's creation and the
	// chmod below it has the umask's mode, and connecting needs write
	// permission, which the usual umask (022) gives only to root.
	if err := os.MkdirAll(filepath.Dir(path), 0o700); err != nil {
		return nil, fmt.Errorf("socket directory: %w", err)
	}
	if c, err := net.DialTimeout("unix", path, time.Second); err == nil {
		c.Close()
		return nil, fmt.Errorf("listen on %s: another overlayd is serving it", path)
	}
	if err := os.Remove(path); err != nil && !errors.Is(err, os.ErrNotExist) {
		return nil, fmt.Errorf("remove stale socket %s: %w", path, err)
	}
	l, err := net.Listen("unix", path)
	if err != nil {
		return nil, fmt.Errorf("listen on %s: %w", path, err)
	}
	if err := os.Chmod(path, 0o600); err != nil {
		l.Close()
		return nil, fmt.Errorf("restrict socket %s: %w", path, err)
	}
	return l, nil
}

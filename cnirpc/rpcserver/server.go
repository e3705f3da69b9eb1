package rpcserver

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"sync"
	"sync/atomic"
	"time"
)

// ServerConfig bounds what the clients of the CNI socket can hold: how
// long each part of an exchange may take and how many connections are
// open at once. A field that is zero or negative takes its value from
// DefaultServerConfig.
type ServerConfig struct {
	// ReadHeaderTimeout bounds the wait for a request's headers, from
	// the connection's accept or, on a kept-alive connection, from the
	// next request's first bytes. A client that connects and sends
	// nothing is disconnected after it.
	ReadHeaderTimeout time.Duration
	// ReadTimeout bounds the reading of a whole request, headers and
	// body, from the same start: a client that stalls its body is
	// disconnected after it. It does not bound the work on a request
	// once its body has been read. It should not be shorter than
	// ReadHeaderTimeout.
	ReadTimeout time.Duration
	// WriteTimeout bounds the answer: writes later than WriteTimeout
	// after the end of the request's headers fail, and the connection is
	// closed. It must outlast the longest request, including the
	// confirmation of an early ADD, which is written once the allocation
	// is on disk.
	WriteTimeout time.Duration
	// IdleTimeout bounds the wait for the next request on a kept-alive
	// connection.
	IdleTimeout time.Duration
	// MaxHeaderBytes bounds the size of a request's headers.
	MaxHeaderBytes int
	// MaxConns caps the connections being served at once. A client over
	// the cap waits, in the kernel's listen backlog or accepted but not
	// yet read, for a connection to end or to be evicted (EvictAfter):
	// the server holds at most MaxConns+1 connections.
	MaxConns int
	// EvictAfter: when MaxConns connections are being served and another
	// client has connected, the connection whose read has waited
	// longest on its client for a request is closed to make room, once
	// that wait has lasted EvictAfter. A connection whose request has
	// been read, and which the server is working on or answering, is
	// never evicted. During a shutdown, a connection that has waited
	// that long is closed without waiting for a newcomer.
	EvictAfter time.Duration
}

// DefaultServerConfig returns the limits overlayd uses on its CNI
// socket.
func DefaultServerConfig() ServerConfig {
	return ServerConfig{
		// The plugin sends its whole request in one write right after
		// it connects: a client that has not sent its headers within
		// 5 s is stuck, not slow. This is also how long a connection
		// that sends nothing holds a slot while the socket is not full.
		ReadHeaderTimeout: 5 * time.Second,
		// The largest body, a GC request of 16 MiB, crosses a Unix
		// socket in tens of milliseconds; 10 s leaves room for a host
		// under heavy load and is how long a stalled body holds a slot
		// while the socket is not full.
		ReadTimeout: 10 * time.Second,
		// overlayd bounds an ADD's allocation and its flush to disk to
		// 10 s each, after a body read within ReadTimeout: 30 s covers
		// the worst case, and is the plugin's own limit on an exchange
		// (cmd/overlay-cni), after which nobody reads the answer.
		WriteTimeout: 30 * time.Second,
		// The plugin never reuses a connection (one HTTP/1.0 exchange
		// each); a kept-alive client such as curl that has sent nothing
		// for 5 s connects again.
		IdleTimeout: 5 * time.Second,
		// The plugin's headers are under 200 bytes; this bounds what a
		// connection's headers can cost in memory.
		MaxHeaderBytes: 16 << 10,
		// A host runs a few hundred containers at most, and a plugin
		// call holds its connection for milliseconds (an early ADD: for
		// as long as the veth takes). 1024 is reached only by clients
		// that hold connections without using them, and leaves most of
		// overlayd's open files to etcd, gossip, netlink and the
		// allocation database.
		MaxConns: 1024,
		// A plugin's read never waits on it for more than microseconds:
		// one that has waited 1 s is stalled. Evicting it only when the
		// socket is full and a newcomer waits keeps stuck clients from
		// holding off an ADD for much more than this.
		EvictAfter: time.Second,
	}
}

// withDefaults returns cfg with every zero or negative field set to its
// default.
func (cfg ServerConfig) withDefaults() ServerConfig {
	def := DefaultServerConfig()
	orDefault(&cfg.ReadHeaderTimeout, def.ReadHeaderTimeout)
	orDefault(&cfg.ReadTimeout, def.ReadTimeout)
	orDefault(&cfg.WriteTimeout, def.WriteTimeout)
	orDefault(&cfg.IdleTimeout, def.IdleTimeout)
	orDefault(&cfg.MaxHeaderBytes, def.MaxHeaderBytes)
	orDefault(&cfg.MaxConns, def.MaxConns)
	orDefault(&cfg.EvictAfter, def.EvictAfter)
	return cfg
}

func orDefault[T time.Duration | int](v *T, def T) {
	if *v <= 0 {
		*v = def
	}
}

// warnEvery bounds how often the server warns that the socket is full.
const warnEvery = time.Minute

// sweepsPerEvictAfter is how many times per EvictAfter a shutdown looks
// for stalled connections to close.
const sweepsPerEvictAfter = 4

// Server serves an http.Handler on the CNI socket within the limits of a
// ServerConfig. Its methods are safe for concurrent use.
type Server struct {
	cfg   ServerConfig
	log   *slog.Logger
	http  *http.Server
	epoch time.Time // readSince counts from it, on the monotonic clock

	mu      sync.Mutex // guards the fields below
	conns   map[*conn]struct{}
	waiters int           // Accepts waiting for a slot
	freed   chan struct{} // closed, and replaced, when a slot frees while waiters > 0
	warned  time.Time     // when the socket was last said to be full
	evicted int           // connections evicted since
}

// NewServer returns a server of h within cfg's limits. The HTTP server's
// own errors (a handler's panic, a failing accept) are logged through
// log at level Error; a nil log discards them.
func NewServer(h http.Handler, cfg ServerConfig, log *slog.Logger) *Server {
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	cfg = cfg.withDefaults()
	s := &Server{
		cfg:   cfg,
		log:   log,
		epoch: time.Now(),
		conns: make(map[*conn]struct{}),
		freed: make(chan struct{}),
	}
	s.http = &http.Server{
		Handler:           s.track(h),
		ReadHeaderTimeout: cfg.ReadHeaderTimeout,
		ReadTimeout:       cfg.ReadTimeout,
		WriteTimeout:      cfg.WriteTimeout,
		IdleTimeout:       cfg.IdleTimeout,
		MaxHeaderBytes:    cfg.MaxHeaderBytes,
		ErrorLog:          slog.NewLogLogger(log.Handler(), slog.LevelError),
		ConnState:         s.connState,
		ConnContext:       s.connContext,
	}
	return s
}

// Serve accepts connections on l and serves them until Shutdown or
// Close, and then returns http.ErrServerClosed; it returns l's error if
// accepting fails. It blocks; l is closed on return.
func (s *Server) Serve(l net.Listener) error {
	return s.http.Serve(&listener{Listener: l, s: s, done: make(chan struct{})})
}

// Shutdown stops accepting connections, closes those that wait on a
// stalled client (EvictAfter) and those that are idle, and waits for the
// requests in progress to be answered. When ctx ends first, it closes
// every connection and returns an error wrapping ctx's.
func (s *Server) Shutdown(ctx context.Context) error {
	stop := make(chan struct{})
	swept := make(chan struct{})
	go func() {
		defer close(swept)
		s.sweep(stop)
	}()
	err := s.http.Shutdown(ctx)
	if err != nil {
		s.http.Close()
	}
	close(stop)
	<-swept
	if err != nil {
		return fmt.Errorf("shut down the CNI socket server: %w", err)
	}
	return nil
}

// Close closes the listeners and every connection at once, answered or
// not.
func (s *Server) Close() error {
	return s.http.Close()
}

// since is the time since s.epoch on the monotonic clock.
func (s *Server) since() time.Duration {
	return time.Since(s.epoch)
}

// admit waits for a slot for nc, evicting a stalled connection when the
// socket is full, and returns nc tracked. When done is closed first it
// closes nc and returns an error.
func (s *Server) admit(nc net.Conn, done <-chan struct{}) (*conn, error) {
	c := &conn{Conn: nc, s: s}
	for {
		s.mu.Lock()
		if len(s.conns) < s.cfg.MaxConns {
			s.conns[c] = struct{}{}
			s.mu.Unlock()
			return c, nil
		}
		victim, waited, wait := s.stalledLocked()
		warn := s.warnLocked()
		if victim != nil {
			delete(s.conns, victim)
			s.evicted++
			evicted := s.evicted
			if warn {
				s.evicted = 0
			}
			s.mu.Unlock()
			victim.closeConn()
			s.log.Debug("CNI socket full: closed a connection whose client stopped sending its request", "waited", waited)
			if warn {
				s.log.Warn("CNI socket at its connection limit: closing connections whose clients stopped sending their request",
					"max-conns", s.cfg.MaxConns, "waited", waited, "closed", evicted)
			}
			continue
		}
		s.waiters++
		freed := s.freed
		s.mu.Unlock()
		if warn {
			s.log.Warn("CNI socket at its connection limit: a new client waits for a request to end",
				"max-conns", s.cfg.MaxConns)
		}
		t := time.NewTimer(wait)
		select {
		case <-freed:
		case <-t.C:
		case <-done:
		}
		t.Stop()
		s.mu.Lock()
		s.waiters--
		s.mu.Unlock()
		select {
		case <-done:
			nc.Close()
			return nil, fmt.Errorf("accept: %w", net.ErrClosed)
		default:
		}
	}
}

// stalledLocked returns the connection whose read has waited longest on
// its client for a request, if it has waited EvictAfter, and how long;
// otherwise, how long until one may have.
func (s *Server) stalledLocked() (victim *conn, waited, wait time.Duration) {
	now := s.since()
	var oldest *conn
	for c := range s.conns {
		if w, ok := c.waited(now); ok && (oldest == nil || w > waited) {
			oldest, waited = c, w
		}
	}
	if oldest != nil && waited >= s.cfg.EvictAfter {
		return oldest, waited, 0
	}
	return nil, 0, s.cfg.EvictAfter - waited
}

// warnLocked reports whether it is time to warn that the socket is full
// again, and if so notes the time.
func (s *Server) warnLocked() bool {
	now := time.Now()
	if !s.warned.IsZero() && now.Sub(s.warned) < warnEvery {
		return false
	}
	s.warned = now
	return true
}

// release gives c's slot back, once.
func (s *Server) release(c *conn) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if _, ok := s.conns[c]; !ok {
		return
	}
	delete(s.conns, c)
	if s.waiters > 0 {
		close(s.freed)
		s.freed = make(chan struct{})
	}
}

// sweep closes the connections that wait on a stalled client, now and
// then every EvictAfter/sweepsPerEvictAfter, until stop is closed.
func (s *Server) sweep(stop <-chan struct{}) {
	t := time.NewTicker(max(s.cfg.EvictAfter/sweepsPerEvictAfter, time.Millisecond))
	defer t.Stop()
	for {
		var stalled []*conn
		now := s.since()
		s.mu.Lock()
		for c := range s.conns {
			if w, ok := c.waited(now); ok && w >= s.cfg.EvictAfter {
				delete(s.conns, c)
				stalled = append(stalled, c)
			}
		}
		s.mu.Unlock()
		for _, c := range stalled {
			c.closeConn()
		}
		select {
		case <-stop:
			return
		case <-t.C:
		}
	}
}

// connState notes that a kept-alive connection waits for its next
// request.
func (s *Server) connState(nc net.Conn, state http.ConnState) {
	if c, ok := nc.(*conn); ok && state == http.StateIdle {
		c.requestRead.Store(false)
	}
}

// connKey is the context key of a request's *conn.
type connKey struct{}

func (s *Server) connContext(ctx context.Context, nc net.Conn) context.Context {
	if c, ok := nc.(*conn); ok {
		return context.WithValue(ctx, connKey{}, c)
	}
	return ctx
}

// track notes when a request has been read, which the connection's
// reads cannot tell: from then on they wait for nothing the server
// needs (net/http's watch for the client going away), and the
// connection is no longer stalled but in progress.
func (s *Server) track(next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		c, ok := r.Context().Value(connKey{}).(*conn)
		if !ok {
			next.ServeHTTP(w, r)
			return
		}
		if r.Body == nil || r.Body == http.NoBody {
			c.requestRead.Store(true)
			next.ServeHTTP(w, r)
			return
		}
		r2 := new(http.Request)
		*r2 = *r
		r2.Body = &trackedBody{ReadCloser: r.Body, c: c}
		next.ServeHTTP(w, r2)
	})
}

// trackedBody is a request's body that marks its connection's request
// read at its end.
type trackedBody struct {
	io.ReadCloser
	c *conn
}

func (b *trackedBody) Read(p []byte) (int, error) {
	n, err := b.ReadCloser.Read(p)
	if err == io.EOF {
		b.c.requestRead.Store(true)
	}
	return n, err
}

// listener admits each connection it accepts within its Server's cap.
type listener struct {
	net.Listener
	s    *Server
	done chan struct{} // closed by Close
	once sync.Once
}

func (l *listener) Accept() (net.Conn, error) {
	nc, err := l.Listener.Accept()
	if err != nil {
		return nil, err
	}
	return l.s.admit(nc, l.done)
}

func (l *listener) Close() error {
	l.once.Do(func() { close(l.done) })
	return l.Listener.Close()
}

// conn is a connection being served, with what eviction needs to know:
// whether the server's read waits on the client for a request, and for
// how long. A read blocks only when the client has sent nothing more, so
// a connection that waits long on a read is stalled by its client, never
// by the server's own load.
type conn struct {
	net.Conn
	s *Server
	// reading is true while a Read is in progress.
	reading atomic.Bool
	// readSince is when the last Read began, as s.since.
	readSince atomic.Int64
	// requestRead is true from when the request has been read (body to
	// its end, or none) to when the connection goes idle.
	requestRead atomic.Bool

	closeOnce sync.Once
	closeErr  error
}

func (c *conn) Read(p []byte) (int, error) {
	c.readSince.Store(int64(c.s.since()))
	c.reading.Store(true)
	n, err := c.Conn.Read(p)
	c.reading.Store(false)
	return n, err
}

// Close gives the connection's slot back and closes it.
func (c *conn) Close() error {
	c.s.release(c)
	return c.closeConn()
}

// CloseWrite shuts down the writing side, as net/http does before it
// closes a connection whose request it did not read to the end, so that
// the client reads the answer.
func (c *conn) CloseWrite() error {
	if cw, ok := c.Conn.(interface{ CloseWrite() error }); ok {
		return cw.CloseWrite()
	}
	return fmt.Errorf("close write: %T cannot", c.Conn)
}

// closeConn closes the connection once, without giving its slot back.
func (c *conn) closeConn() error {
	c.closeOnce.Do(func() { c.closeErr = c.Conn.Close() })
	return c.closeErr
}

// waited returns how long the server's read has waited on the client for
// a request, at now (as s.since); false when it does not wait for one.
func (c *conn) waited(now time.Duration) (time.Duration, bool) {
	if !c.reading.Load() || c.requestRead.Load() {
		return 0, false
	}
	return now - time.Duration(c.readSince.Load()), true
}

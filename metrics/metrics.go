// Package metrics defines overlayd's Prometheus metrics on a registry of
// its own (never the global one) and serves them over HTTP.
package metrics

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"strconv"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"
)

// namespace prefixes every metric name.
const namespace = "overlay"

// Metrics are overlayd's metrics. Its fields are safe for concurrent use.
type Metrics struct {
	// Registry holds every metric below plus Go and process metrics.
	Registry *prometheus.Registry
	// CNIRequests counts CNI socket requests by operation and HTTP
	// status of the answer (200 for success).
	CNIRequests *prometheus.CounterVec
	// CNIDuration observes the latency of CNI socket requests.
	CNIDuration *prometheus.HistogramVec
	// MirrorFailures counts failed copies of this host's allocations to
	// etcd; each is retried a second later.
	MirrorFailures prometheus.Counter
}

// New returns the metrics on a fresh registry.
func New() *Metrics {
	m := &Metrics{
		Registry: prometheus.NewRegistry(),
		CNIRequests: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: namespace, Subsystem: "cni", Name: "requests_total",
			Help: "CNI socket requests by operation and HTTP status of the answer (200 is success).",
		}, []string{"op", "status"}),
		CNIDuration: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Namespace: namespace, Subsystem: "cni", Name: "request_duration_seconds",
			Help:    "Latency of CNI socket requests, as overlayd serves them.",
			Buckets: prometheus.ExponentialBuckets(0.0005, 2, 14), // 0.5ms to 4s
		}, []string{"op"}),
		MirrorFailures: prometheus.NewCounter(prometheus.CounterOpts{
			Namespace: namespace, Subsystem: "ipam", Name: "mirror_failures_total",
			Help: "Failed copies of this host's allocations to etcd (each retried a second later).",
		}),
	}
	m.Registry.MustRegister(
		collectors.NewGoCollector(),
		collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}),
		m.CNIRequests, m.CNIDuration, m.MirrorFailures,
	)
	return m
}

// ObserveCNI counts and times one CNI socket request by operation and the
// HTTP status of its outcome (an rpcserver.Observe).
func (m *Metrics) ObserveCNI(op string, status int, took time.Duration) {
	m.CNIDuration.WithLabelValues(op).Observe(took.Seconds())
	m.CNIRequests.WithLabelValues(op, strconv.Itoa(status)).Inc()
}

// GaugeFunc registers a gauge whose value fn reads at scrape time; fn
// must be safe for concurrent use and must not block.
func (m *Metrics) GaugeFunc(subsystem, name, help string, labels prometheus.Labels, fn func() float64) {
	m.Registry.MustRegister(prometheus.NewGaugeFunc(prometheus.GaugeOpts{
		Namespace: namespace, Subsystem: subsystem, Name: name, Help: help, ConstLabels: labels,
	}, fn))
}

// CounterFunc registers a counter whose value fn reads at scrape time.
func (m *Metrics) CounterFunc(subsystem, name, help string, labels prometheus.Labels, fn func() float64) {
	m.Registry.MustRegister(prometheus.NewCounterFunc(prometheus.CounterOpts{
		Namespace: namespace, Subsystem: subsystem, Name: name, Help: help, ConstLabels: labels,
	}, fn))
}

// Group is a set of metrics with the same constant labels that are
// registered and unregistered together: those of one network, which come
// and go as networks are created and deleted. It is safe for concurrent
// use.
type Group struct {
	reg    *prometheus.Registry
	labels prometheus.Labels

	mu sync.Mutex
	cs []prometheus.Collector
}

// Group returns an empty group whose metrics carry labels.
func (m *Metrics) Group(labels prometheus.Labels) *Group {
	return &Group{reg: m.Registry, labels: labels}
}

func (g *Group) register(c prometheus.Collector) {
	g.reg.MustRegister(c)
	g.mu.Lock()
	g.cs = append(g.cs, c)
	g.mu.Unlock()
}

// GaugeFunc registers a gauge of the group whose value fn reads at scrape
// time; fn must be safe for concurrent use and must not block.
func (g *Group) GaugeFunc(subsystem, name, help string, fn func() float64) {
	g.register(prometheus.NewGaugeFunc(prometheus.GaugeOpts{
		Namespace: namespace, Subsystem: subsystem, Name: name, Help: help, ConstLabels: g.labels,
	}, fn))
}

// CounterFunc registers a counter of the group whose value fn reads at
// scrape time.
func (g *Group) CounterFunc(subsystem, name, help string, fn func() float64) {
	g.register(prometheus.NewCounterFunc(prometheus.CounterOpts{
		Namespace: namespace, Subsystem: subsystem, Name: name, Help: help, ConstLabels: g.labels,
	}, fn))
}

// Unregister removes every metric of the group from the registry.
func (g *Group) Unregister() {
	g.mu.Lock()
	defer g.mu.Unlock()
	for _, c := range g.cs {
		g.reg.Unregister(c)
	}
	g.cs = nil
}

// Serve serves /metrics, and handlers at their patterns, on l until ctx
// is done. The caller opens l, so that an address already in use is found
// before the daemon reports ready.
func (m *Metrics) Serve(ctx context.Context, l net.Listener, handlers map[string]http.Handler) error {
	mux := http.NewServeMux()
	mux.Handle("/metrics", promhttp.HandlerFor(m.Registry, promhttp.HandlerOpts{}))
	for pattern, h := range handlers {
		mux.Handle(pattern, h)
	}
	srv := &http.Server{Handler: mux, ReadHeaderTimeout: 5 * time.Second}
	go func() {
		<-ctx.Done()
		sctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), time.Second)
		defer cancel()
		_ = srv.Shutdown(sctx)
	}()
	if err := srv.Serve(l); err != nil && !errors.Is(err, http.ErrServerClosed) {
		return fmt.Errorf("serve metrics: %w", err)
	}
	return ctx.Err()
}

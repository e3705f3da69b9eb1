// Package embedded runs a single-member etcd inside the calling process:
// the store of a single machine, and of tests. It links etcd's server;
// clients of etcd need only package etcd, so that commands that only
// talk to a cluster do not link it.
package embedded

import (
	"context"
	"fmt"
	"log/slog"
	"net/url"
	"path/filepath"
	"time"

	"go.etcd.io/etcd/server/v3/embed"
	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"

	"github.com/overlaynet/overlay/internal/zapslog"
)

// startTimeout bounds how long an embedded etcd may take to elect itself
// leader and serve clients.
const startTimeout = 60 * time.Second

// Config configures an embedded single-member etcd.
type Config struct {
	// Dir is the data directory.
	Dir string
	// ClientURL is where it serves clients, for example
	// http://127.0.0.1:2379 or unix:///run/overlay/etcd.sock.
	ClientURL string
	// PeerURL is where it listens for peers; a single member talks to
	// none, but etcd always listens.
	PeerURL string
	// Logger receives a line when it starts and stops, and the server's
	// errors.
	Logger *slog.Logger
}

// Server is a running embedded etcd.
type Server struct {
	e *embed.Etcd
	// ClientURL is where it serves clients.
	ClientURL string
}

// Start starts a single-member etcd in cfg.Dir and waits until it
// serves clients. Its own errors go to cfg.Logger (with component=etcd);
// its failures also reach the caller as errors (here and on Err). Close
// stops it.
func Start(ctx context.Context, cfg Config) (*Server, error) {
	ecfg := embed.NewConfig()
	ecfg.Dir = filepath.Join(cfg.Dir, "etcd")
	ecfg.Name = "overlayd"
	zl := zap.NewNop()
	if cfg.Logger != nil {
		// Errors only: a single member has no peers to lose, and its
		// warnings (slow requests on a busy disk) are its clients' to
		// report, as overlayd does when a request fails.
		zl = zapslog.New(cfg.Logger.With("component", "etcd").Handler(), zapcore.ErrorLevel)
	}
	ecfg.ZapLoggerBuilder = embed.NewZapLoggerBuilder(zl)
	cu, err := url.Parse(cfg.ClientURL)
	if err != nil {
		return nil, fmt.Errorf("embedded etcd client URL %q: %w", cfg.ClientURL, err)
	}
	pu, err := url.Parse(cfg.PeerURL)
	if err != nil {
		return nil, fmt.Errorf("embedded etcd peer URL %q: %w", cfg.PeerURL, err)
	}
	ecfg.ListenClientUrls = []url.URL{*cu}
	ecfg.AdvertiseClientUrls = []url.URL{*cu}
	ecfg.ListenPeerUrls = []url.URL{*pu}
	ecfg.AdvertisePeerUrls = []url.URL{*pu}
	ecfg.InitialCluster = ecfg.Name + "=" + pu.String()
	// Auto-compact hourly so the revision history of renewals stays small.
	ecfg.AutoCompactionMode = "periodic"
	ecfg.AutoCompactionRetention = "1h"

	e, err := embed.StartEtcd(ecfg)
	if err != nil {
		return nil, fmt.Errorf("start embedded etcd in %s: %w", ecfg.Dir, err)
	}
	select {
	case <-e.Server.ReadyNotify():
	case err := <-e.Err():
		e.Close()
		return nil, fmt.Errorf("embedded etcd failed: %w", err)
	case <-time.After(startTimeout):
		e.Close()
		return nil, fmt.Errorf("embedded etcd not ready after %s", startTimeout)
	case <-ctx.Done():
		e.Close()
		return nil, ctx.Err()
	}
	if cfg.Logger != nil {
		cfg.Logger.Info("running embedded etcd (single machine; pass --etcd-endpoints for a cluster)", "dir", ecfg.Dir, "client-url", cfg.ClientURL)
	}
	return &Server{e: e, ClientURL: cfg.ClientURL}, nil
}

// Err returns a channel that receives a fatal server error.
func (e *Server) Err() <-chan error { return e.e.Err() }

// Close stops the server.
func (e *Server) Close() { e.e.Close() }

package etcd

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"log/slog"
	"time"

	"go.etcd.io/etcd/client/pkg/v3/transport"
	clientv3 "go.etcd.io/etcd/client/v3"
	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
	"google.golang.org/grpc"
	"google.golang.org/grpc/backoff"

	"github.com/overlaynet/overlay/internal/zapslog"
)

// ClientConfig says how to reach an etcd cluster.
type ClientConfig struct {
	// Endpoints are the cluster's client URLs: http://, https:// or
	// unix:// (a socket path).
	Endpoints []string
	// CertFile and KeyFile are the client certificate and key for mutual
	// TLS; both empty means no client certificate.
	CertFile, KeyFile string
	// CAFile verifies the servers' certificates; empty means the system
	// roots.
	CAFile string
	// DialTimeout bounds the first connection.
	DialTimeout time.Duration
	// DialOptions are more gRPC options for the client, such as the
	// interceptors that count its requests.
	DialOptions []grpc.DialOption
	// Logger receives the client's own warnings and errors (a member
	// that cannot be reached, a request retried); nil discards them.
	Logger *slog.Logger
}

// How the client finds its way back to a member that went away. gRPC's
// defaults wait 1 s after the first failed attempt to reconnect and 1.6
// times longer after each further one, up to 2 minutes: 10 s into an
// outage the next attempt may be 6 s away, 20 s into it 10 s away, and
// the client's requests, which wait for a connection, wait with it, long
// after etcd is back. These are not operator knobs: they decide how soon
// a client notices that a member is back, not whether it works.
const (
	// redialDelay is the wait between attempts to reconnect to a member,
	// give or take redialJitter of itself: short enough that a member
	// that is back is used within a second, long enough that a member
	// that stays down gets two connection attempts a second from each
	// host, not a flood.
	redialDelay  = 500 * time.Millisecond
	redialJitter = 0.2
	// connectTimeout bounds one connection attempt, TLS handshake
	// included, so that an attempt to a member whose host does not answer
	// at all (no refusal either) is given up and made again.
	connectTimeout = 2 * time.Second
	// keepaliveTime and keepaliveTimeout: while a request or watch is
	// open on a connection, the client pings the member after
	// keepaliveTime without a word from it and drops the connection if
	// the answer takes longer than keepaliveTimeout, so a member whose
	// host died, and never closed the connection, is noticed and another
	// used. 10 s is the least gRPC allows. Idle connections are not
	// pinged: etcd closes connections that ping without a request open.
	keepaliveTime    = 10 * time.Second
	keepaliveTimeout = 3 * time.Second
)

// dialOptions are the gRPC options of every client: quick reconnects.
func dialOptions() []grpc.DialOption {
	return []grpc.DialOption{
		grpc.WithConnectParams(grpc.ConnectParams{
			Backoff: backoff.Config{
				BaseDelay:  redialDelay,
				Multiplier: 1, // no growth: an outage's length says nothing of when it ends
				Jitter:     redialJitter,
				MaxDelay:   redialDelay,
			},
			MinConnectTimeout: connectTimeout,
		}),
	}
}

// clientLogger returns the etcd client's zap logger: log's handler from
// warnings up, or nothing.
func clientLogger(log *slog.Logger) *zap.Logger {
	if log == nil {
		return zap.NewNop()
	}
	return zapslog.New(log.Handler(), zapcore.WarnLevel)
}

// Connect returns a client of the cluster and checks that it answers
// within cfg.DialTimeout, so a wrong endpoint fails at start with a clear
// error instead of on the first request.
//
// The client's requests wait for a connection to a member until their
// context is done, so every request needs a bound (Store's methods bound
// those whose context has none). A member that goes away is redialled
// every half second or so, however long it has been away. A connection to a member that died without closing it is
// dropped after about 13 s of silence while a request or watch is open on
// it (keepaliveTime and keepaliveTimeout); requests then go to the
// members still connected.
// The client is safe for concurrent use; Close it when done.
func Connect(ctx context.Context, cfg ClientConfig) (*clientv3.Client, error) {
	if len(cfg.Endpoints) == 0 {
		return nil, errors.New("connect to etcd: no endpoints")
	}
	if cfg.DialTimeout <= 0 {
		cfg.DialTimeout = 5 * time.Second
	}
	var tlsCfg *tls.Config
	if cfg.CertFile != "" || cfg.KeyFile != "" || cfg.CAFile != "" {
		info := transport.TLSInfo{CertFile: cfg.CertFile, KeyFile: cfg.KeyFile, TrustedCAFile: cfg.CAFile}
		var err error
		if tlsCfg, err = info.ClientConfig(); err != nil {
			return nil, fmt.Errorf("etcd client TLS: %w", err)
		}
	}
	cli, err := clientv3.New(clientv3.Config{
		Endpoints:   cfg.Endpoints,
		DialTimeout: cfg.DialTimeout,
		TLS:         tlsCfg,
		Logger:      clientLogger(cfg.Logger),
		Context:     context.WithoutCancel(ctx),

		DialKeepAliveTime:    keepaliveTime,
		DialKeepAliveTimeout: keepaliveTimeout,
		DialOptions:          append(dialOptions(), cfg.DialOptions...),
	})
	if err != nil {
		return nil, fmt.Errorf("etcd client for %v: %w", cfg.Endpoints, err)
	}
	// List the members over the client's own connection, rather than
	// read a key: it needs no permission on any key, a member that is down
	// is passed over by the client's balancer, and the connection every
	// later request uses is then up (a separate status request per
	// endpoint would dial each once more, and leave the first request to
	// dial again).
	cctx, cancel := context.WithTimeout(ctx, cfg.DialTimeout)
	defer cancel()
	_, err = cli.MemberList(cctx, clientv3.WithSerializable())
	if err == nil {
		return cli, nil
	}
	cli.Close()
	return nil, fmt.Errorf("etcd at %v does not answer within %s (check --etcd-endpoints and TLS flags): %w", cfg.Endpoints, cfg.DialTimeout, err)
}

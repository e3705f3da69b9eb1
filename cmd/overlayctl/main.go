// Command overlayctl is the overlay's operator command line. It talks to
// etcd as a client (it never runs an etcd server) and works from any
// machine that reaches the cluster's etcd.
//
// Usage:
//
//	overlayctl [connection flags] network create NAME --cidr CIDR [flags]
//	overlayctl [connection flags] network list [--json]
//	overlayctl [connection flags] network inspect NAME [--json]
//	overlayctl [connection flags] network delete NAME [--force]
//	overlayctl [connection flags] endpoint list NETWORK [--host ID] [--label KEY=VALUE] [--json]
//	overlayctl [connection flags] host list [--json]
//	overlayctl [connection flags] host remove ID
//	overlayctl [connection flags] block list [--network NAME] [--host ID] [--json]
//	overlayctl [connection flags] address holder NETWORK ADDR [--json]
//	overlayctl [--socket PATH] address release NETWORK ADDR [--force]
//	overlayctl [--socket PATH] status [--json]
//	overlayctl [connection flags] doctor [--local] [--json]
//	overlayctl --version
//
// The connection flags can also be set in the environment:
// OVERLAYCTL_ETCD_ENDPOINTS, OVERLAYCTL_ETCD_CA, OVERLAYCTL_SOCKET and so
// on; the command line wins.
//
// status, doctor --local and address release talk to the overlayd of
// this host over its socket (root only); the other commands talk to etcd
// and work from any machine that reaches it.
//
// Exit codes: 0 success, 1 the command failed (etcd or overlayd
// unreachable, a network refused), 2 a usage error, 3 doctor found an
// error. docs/operations.md describes the commands.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/signal"
	"strings"
	"syscall"
	"time"

	"github.com/overlaynet/overlay/cnirpc"
	"github.com/peterbourgon/ff/v3"

	"github.com/overlaynet/overlay/internal/version"
	"github.com/overlaynet/overlay/ipam/etcd"
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()
	os.Exit(run(ctx, os.Args[1:], os.Stdout, os.Stderr))
}

// usageError is a command line that cannot be run: exit code 2.
type usageError struct{ msg string }

func (e usageError) Error() string { return e.msg }

func usagef(format string, args ...any) error { return usageError{fmt.Sprintf(format, args...)} }

// envPrefix starts the environment variables that set overlayctl's
// connection flags: OVERLAYCTL_ETCD_ENDPOINTS sets --etcd-endpoints.
const envPrefix = "OVERLAYCTL"

// conn is how overlayctl reaches etcd, and this host's overlayd.
type conn struct {
	cfg    etcd.ClientConfig
	prefix string
	socket string
}

// store connects to etcd and returns the overlay's store there, and the
// function that closes the connection.
func (c conn) store(ctx context.Context) (*etcd.Store, func(), error) {
	cli, err := etcd.Connect(ctx, c.cfg)
	if err != nil {
		return nil, nil, fmt.Errorf("%w (set --etcd-endpoints, and --etcd-ca, --etcd-cert and --etcd-key for TLS)", err)
	}
	return etcd.NewStore(cli, c.prefix), func() { cli.Close() }, nil
}

func run(ctx context.Context, args []string, stdout, stderr io.Writer) int {
	err := dispatch(ctx, args, stdout, stderr)
	var u usageError
	switch {
	case err == nil:
		return 0
	case errors.Is(err, flag.ErrHelp):
		return 0
	case errors.As(err, &u):
		fmt.Fprintf(stderr, "overlayctl: %v\n", err)
		return 2
	case errors.Is(err, errFindings):
		return 3
	}
	fmt.Fprintf(stderr, "overlayctl: %v\n", err)
	return 1
}

func dispatch(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs := flag.NewFlagSet("overlayctl", flag.ContinueOnError)
	fs.SetOutput(stderr)
	var c conn
	endpoints := fs.String("etcd-endpoints", "http://127.0.0.1:2379", "comma-separated etcd client URLs (http://, https://, unix://); the default is the embedded etcd of overlayd's defaults")
	fs.StringVar(&c.cfg.CertFile, "etcd-cert", "", "client certificate for etcd (mutual TLS)")
	fs.StringVar(&c.cfg.KeyFile, "etcd-key", "", "client key for etcd (mutual TLS)")
	fs.StringVar(&c.cfg.CAFile, "etcd-ca", "", "CA bundle that verifies etcd's server certificates")
	fs.DurationVar(&c.cfg.DialTimeout, "etcd-dial-timeout", 5*time.Second, "how long to wait for etcd")
	fs.StringVar(&c.prefix, "etcd-prefix", etcd.DefaultPrefix, "key prefix of the overlay's state in etcd")
	fs.StringVar(&c.socket, "socket", cnirpc.DefaultSocket, "overlayd's socket on this host (status, doctor --local, address release)")
	showVersion := fs.Bool("version", false, "print overlayctl's version and exit")
	fs.Usage = func() {
		fmt.Fprintln(stderr, `usage: overlayctl [flags] network create|list|inspect|delete ...
       overlayctl [flags] endpoint list NETWORK ...
       overlayctl [flags] host list|remove ...
       overlayctl [flags] block list ...
       overlayctl [flags] address holder|release NETWORK ADDR
       overlayctl [flags] status
       overlayctl [flags] doctor [--local]`)
		fs.PrintDefaults()
	}
	// Each connection flag can come from the environment too:
	// OVERLAYCTL_ and the flag's name in capitals with _ for -, so that
	// a shell (or a profile on a host) sets the cluster's TLS files once.
	if err := ff.Parse(fs, args, ff.WithEnvVarPrefix(envPrefix)); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return err
		}
		return usageError{strings.TrimPrefix(err.Error(), "error parsing commandline arguments: ")}
	}
	if *showVersion {
		fmt.Fprintln(stdout, version.String("overlayctl"))
		return nil
	}
	for _, e := range strings.Split(*endpoints, ",") {
		if e = strings.TrimSpace(e); e != "" {
			c.cfg.Endpoints = append(c.cfg.Endpoints, e)
		}
	}
	if len(c.cfg.Endpoints) == 0 {
		return usagef("--etcd-endpoints: want at least one URL")
	}
	rest := fs.Args()
	if len(rest) == 0 {
		fs.Usage()
		return usagef("want a command: network, endpoint, host, block, address, status or doctor")
	}
	switch rest[0] {
	case "network", "networks", "net":
		return networkCmd(ctx, c, rest[1:], stdout, stderr)
	case "endpoint", "endpoints", "ep":
		return endpointCmd(ctx, c, rest[1:], stdout, stderr)
	case "host", "hosts":
		return hostCmd(ctx, c, rest[1:], stdout, stderr)
	case "block", "blocks":
		return blockCmd(ctx, c, rest[1:], stdout, stderr)
	case "address", "addr":
		return addressCmd(ctx, c, rest[1:], stdout, stderr)
	case "status":
		return statusCmd(ctx, c, rest[1:], stdout, stderr)
	case "doctor":
		return doctorCmd(ctx, c, rest[1:], stdout, stderr)
	}
	return usagef("unknown command %q (want network, endpoint, host, block, address, status or doctor)", rest[0])
}

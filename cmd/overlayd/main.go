// Command overlayd is the overlay's per-host daemon: it leases address
// blocks from etcd, programs the VXLAN dataplane, gossips with the other
// hosts and serves the overlay-cni plugin.
//
// Usage:
//
//	overlayd [flags]                      run the daemon
//	overlayd teardown [flags]             remove this host from the overlay for good
//	overlayd remove-host [flags] HOST-ID  remove a host that is gone, from any host
//	overlayd install-cni [flags]          put the plugin and a conflist into the runtime's directories
//
// Run "overlayd -h" for the flags; docs/configuration.md describes them.
// Each flag can also come from an OVERLAYD_* environment variable and from
// the file that --config names; a flag on the command line wins over its
// environment variable, which wins over the file.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"math"
	"net/netip"
	"os"
	"os/signal"
	"regexp"
	"strings"
	"syscall"
	"time"

	"github.com/peterbourgon/ff/v3"

	"github.com/overlaynet/overlay/daemon"
	"github.com/overlaynet/overlay/internal/version"
	"github.com/overlaynet/overlay/overlay"
)

func main() {
	os.Exit(run(os.Args[1:], os.Stdout, os.Stderr))
}

// errVersion is what parseFlags returns for --version.
var errVersion = errors.New("version asked for")

func run(args []string, stdout, stderr io.Writer) int {
	cmd := "run"
	if len(args) > 0 && !strings.HasPrefix(args[0], "-") {
		cmd, args = args[0], args[1:]
	}
	if cmd == "install-cni" {
		return runInstall(args, stdout, stderr)
	}
	if cmd != "run" && cmd != "teardown" && cmd != "remove-host" {
		fmt.Fprintf(stderr, "overlayd: unknown command %q (want run, teardown, remove-host or install-cni)\n", cmd)
		return 2
	}
	cfg, logger, rest, err := parseFlags(cmd, args, stderr)
	if errors.Is(err, flag.ErrHelp) {
		return 0
	}
	if errors.Is(err, errVersion) {
		fmt.Fprintln(stdout, version.String("overlayd"))
		return 0
	}
	if err == nil && cmd == "remove-host" && len(rest) != 1 {
		err = errors.New("remove-host: want the flags, then the ID of the host to remove (overlayd logs it as host=)")
	} else if err == nil && cmd != "remove-host" && len(rest) > 0 {
		err = fmt.Errorf("unexpected arguments %q", rest)
	}
	if err != nil {
		fmt.Fprintf(stderr, "overlayd: %v\n", err)
		return 2
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()
	switch cmd {
	case "teardown":
		err = daemon.Teardown(ctx, cfg)
	case "remove-host":
		err = daemon.RemoveHost(ctx, cfg, overlay.HostID(rest[0]))
	default:
		// SIGHUP reloads the gossip keys, rather than ending overlayd as
		// it would by default.
		hup := make(chan os.Signal, 1)
		signal.Notify(hup, syscall.SIGHUP)
		defer signal.Stop(hup)
		reload := make(chan struct{}, 1)
		go func() {
			for range hup {
				select {
				case reload <- struct{}{}:
				default:
				}
			}
		}()
		cfg.ReloadKeys = reload
		err = daemon.Run(ctx, cfg)
	}
	if err != nil {
		logger.Error("overlayd failed", "cmd", cmd, "err", err)
		return 1
	}
	return 0
}

func parseFlags(cmd string, args []string, stderr io.Writer) (daemon.Config, *slog.Logger, []string, error) {
	cfg := daemon.DefaultConfig()
	fs := flag.NewFlagSet("overlayd "+cmd, flag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.StringVar(&cfg.DataDir, "data-dir", cfg.DataDir, "directory for the host ID and the embedded etcd's data")
	fs.StringVar(&cfg.Socket, "socket", cfg.Socket, "Unix socket the CNI plugin talks to")
	endpoints := fs.String("etcd-endpoints", "", "comma-separated etcd client URLs (http://, https://, unix://); empty runs an embedded etcd")
	fs.StringVar(&cfg.Etcd.CertFile, "etcd-cert", "", "client certificate for etcd (mutual TLS)")
	fs.StringVar(&cfg.Etcd.KeyFile, "etcd-key", "", "client key for etcd (mutual TLS)")
	fs.StringVar(&cfg.Etcd.CAFile, "etcd-ca", "", "CA bundle that verifies etcd's server certificates")
	fs.DurationVar(&cfg.Etcd.DialTimeout, "etcd-dial-timeout", cfg.Etcd.DialTimeout, "how long to wait for etcd at start")
	fs.StringVar(&cfg.EtcdPrefix, "etcd-prefix", cfg.EtcdPrefix, "key prefix of the overlay's state in etcd")
	fs.StringVar(&cfg.EmbeddedClientURL, "embedded-etcd-client-url", cfg.EmbeddedClientURL, "where the embedded etcd serves clients (http:// or unix://)")
	fs.StringVar(&cfg.EmbeddedPeerURL, "embedded-etcd-peer-url", cfg.EmbeddedPeerURL, "where the embedded etcd listens for peers")
	fs.StringVar(&cfg.Network.Name, "network", cfg.Network.Name, "network made sure of at start, with the four flags below (created when absent, checked when present); empty for none: overlayctl creates the others")
	cidr := fs.String("network-cidr", cfg.Network.CIDR.String(), "address space of the network")
	fs.IntVar(&cfg.Network.BlockBits, "block-bits", cfg.Network.BlockBits, "prefix length of the blocks hosts lease (26 = 64 addresses)")
	vni := fs.Uint("vni", uint(cfg.Network.VNI), "VXLAN network identifier")
	port := fs.Uint("vxlan-port", uint(cfg.Network.Port), "VXLAN UDP port")
	underlay := fs.String("underlay-addr", "", "local underlay address; empty takes the address of the default route's interface")
	fs.IntVar(&cfg.GossipPort, "gossip-port", cfg.GossipPort, "TCP and UDP port for gossip")
	fs.StringVar(&cfg.GossipKeyFile, "gossip-key-file", cfg.GossipKeyFile, "file of base64 keys that encrypt gossip, the first one used to send (mode 0600; SIGHUP reloads it); empty leaves gossip unencrypted")
	fs.StringVar(&cfg.MetricsAddr, "metrics-addr", cfg.MetricsAddr, "host:port serving /metrics; empty disables it")
	fs.StringVar(&cfg.DockerSocket, "docker-plugin-socket", cfg.DockerSocket, "Unix socket serving Docker's network and IPAM plugin protocols (the plugin overlaynet); empty disables it")
	fs.DurationVar(&cfg.DockerSweep, "docker-sweep-interval", cfg.DockerSweep, "how often to look for addresses dockerd was given and left without a wired endpoint; one found twice in a row is released")
	fs.DurationVar(&cfg.ResyncInterval, "resync-interval", cfg.ResyncInterval, "how often the dataplane is checked when nothing changed")
	fs.IntVar(&cfg.MaxBlocks, "max-blocks", cfg.MaxBlocks, "most blocks of the network this host may hold (at least 1)")
	fs.DurationVar(&cfg.IdleBlock, "block-idle", cfg.IdleBlock, "how long a block other than the host's last stays empty before it is given back")
	fs.DurationVar(&cfg.ReclaimAfter, "reclaim-after", cfg.ReclaimAfter, "how long a host's liveness key must be gone before other hosts free its blocks")
	fs.DurationVar(&cfg.OrphanGrace, "orphan-grace", cfg.OrphanGrace, "how long after start to wait before releasing the addresses of containers whose veth is gone")
	fs.DurationVar(&cfg.DoctorInterval, "doctor-interval", cfg.DoctorInterval, "how often the doctor checks this host and stores its report in etcd for overlayctl doctor")
	noMesh := fs.Bool("no-health-mesh", false, "do not probe the peers across the overlay")
	fs.DurationVar(&cfg.MeshInterval, "mesh-interval", cfg.MeshInterval, "how often the health mesh probes each peer of each network, while --mesh-rate allows")
	fs.Float64Var(&cfg.MeshRate, "mesh-rate", cfg.MeshRate, "the health mesh's budget: peers probed per second at most (a small and a full-MTU ping each)")
	logLevel := fs.String("log-level", "info", "debug, info, warn or error")
	logFormat := fs.String("log-format", "text", "text or json")
	fs.String("config", "", "file of flags, one per line as `name value` (# starts a comment); the command line and OVERLAYD_* environment variables override it")
	showVersion := fs.Bool("version", false, "print overlayd's version and exit")
	err := ff.Parse(fs, args, ff.WithEnvVarPrefix(envPrefix), ff.WithConfigFileFlag("config"), ff.WithConfigFileParser(fileParser(fs)))
	if err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return cfg, nil, nil, err
		}
		return cfg, nil, nil, configError(err, fs.Lookup("config").Value.String())
	}
	if *showVersion {
		return cfg, nil, nil, errVersion
	}
	cfg.NoMesh = *noMesh

	var level slog.Level
	if err := level.UnmarshalText([]byte(*logLevel)); err != nil {
		return cfg, nil, nil, fmt.Errorf("--log-level %q: want debug, info, warn or error", *logLevel)
	}
	hopts := &slog.HandlerOptions{Level: level}
	switch *logFormat {
	case "text":
		cfg.Logger = slog.New(slog.NewTextHandler(stderr, hopts))
	case "json":
		cfg.Logger = slog.New(slog.NewJSONHandler(stderr, hopts))
	default:
		return cfg, nil, nil, fmt.Errorf("--log-format %q: want text or json", *logFormat)
	}

	if *endpoints != "" {
		for _, e := range strings.Split(*endpoints, ",") {
			if e = strings.TrimSpace(e); e != "" {
				cfg.Etcd.Endpoints = append(cfg.Etcd.Endpoints, e)
			}
		}
	}
	if cfg.Network.CIDR, err = netip.ParsePrefix(*cidr); err != nil {
		return cfg, nil, nil, fmt.Errorf("--network-cidr: %w", err)
	}
	if *vni > overlay.MaxVNI {
		return cfg, nil, nil, fmt.Errorf("--vni %d: want 1 to %d", *vni, overlay.MaxVNI)
	}
	cfg.Network.VNI = uint32(*vni)
	if *port == 0 || *port > math.MaxUint16 {
		return cfg, nil, nil, fmt.Errorf("--vxlan-port %d: want 1 to 65535", *port)
	}
	cfg.Network.Port = uint16(*port)
	if *underlay != "" {
		if cfg.UnderlayAddr, err = netip.ParseAddr(*underlay); err != nil || !cfg.UnderlayAddr.Is4() {
			return cfg, nil, nil, fmt.Errorf("--underlay-addr %q: want an IPv4 address", *underlay)
		}
	}
	if cfg.Network.Name != "" {
		if err := cfg.Network.Validate(); err != nil {
			return cfg, nil, nil, err
		}
	}
	if cfg.MaxBlocks < 1 {
		return cfg, nil, nil, fmt.Errorf("--max-blocks %d: want at least 1 (one block of /%d holds %d containers)", cfg.MaxBlocks, cfg.Network.BlockBits, cfg.Network.BlockCapacity())
	}
	if cfg.ReclaimAfter < time.Second {
		return cfg, nil, nil, fmt.Errorf("--reclaim-after %s: want at least 1s (the default, 24h, lets a host be down for a day)", cfg.ReclaimAfter)
	}
	if cfg.IdleBlock <= 0 {
		return cfg, nil, nil, fmt.Errorf("--block-idle %s: want a positive duration", cfg.IdleBlock)
	}
	return cfg, cfg.Logger, fs.Args(), nil
}

// envPrefix starts the environment variable of every flag: --etcd-endpoints
// is OVERLAYD_ETCD_ENDPOINTS.
const envPrefix = "OVERLAYD"

// fileError is a line of the --config file that cannot be used.
type fileError struct {
	name, value string
	err         error // nil: no such flag
}

func (e *fileError) Error() string {
	if e.err == nil {
		return fmt.Sprintf("%q: no such flag (overlayd -h lists them)", e.name)
	}
	return fmt.Sprintf("%s %q: %v", e.name, e.value, e.err)
}

// fileParser reads the --config file as ff.PlainParser does, and makes
// its errors fileErrors, which name the flag and the value.
func fileParser(fs *flag.FlagSet) ff.ConfigFileParser {
	return func(r io.Reader, set func(name, value string) error) error {
		return ff.PlainParser(r, func(name, value string) error {
			if err := set(name, value); err != nil {
				if fs.Lookup(name) == nil {
					return &fileError{name: name}
				}
				return &fileError{name: name, value: value, err: errors.Unwrap(err)}
			}
			return nil
		})
	}
}

// envError finds, in ff.Parse's error about an environment variable, the
// variable and the flag it sets.
var envError = regexp.MustCompile(`setting flag "([^"]+)" from environment variable "([^"]+)"`)

// configError rewords what ff.Parse returns so that it names where the
// bad value came from (the command line, an environment variable or the
// --config file at path), the flag and the value.
func configError(err error, path string) error {
	var fe *fileError
	if errors.As(err, &fe) {
		return fmt.Errorf("--config file %s: %w", path, fe)
	}
	msg := err.Error()
	if m := envError.FindStringSubmatch(msg); m != nil {
		cause := err
		for errors.Unwrap(cause) != nil {
			cause = errors.Unwrap(cause)
		}
		return fmt.Errorf("environment: %s=%q (flag --%s): %v", m[2], os.Getenv(m[2]), m[1], cause)
	}
	if rest, ok := strings.CutPrefix(msg, "error parsing commandline arguments: "); ok {
		return errors.New("command line: " + rest)
	}
	if errors.Is(err, os.ErrNotExist) || errors.Is(err, os.ErrPermission) {
		return fmt.Errorf("--config file: %w", err)
	}
	return err
}

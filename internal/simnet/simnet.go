// Package simnet builds simulated hosts on one Linux machine for the
// end-to-end tests and the demo: each host is a network namespace wired to
// an underlay bridge that sits in a namespace of its own, runs the real
// overlayd, and attaches containers (namespaces too) through the real
// overlay-cni binary via libcni.
//
// Everything a Net creates carries a prefix unique to the run
// ("ovs<pid>-"), lives in namespaces it created, and is removed by Close,
// on interrupt, and by the next run if this one was killed. The root
// namespace gets no address, route or link. It needs root.
package simnet

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/base64"
	"errors"
	"fmt"
	"io"
	"net/netip"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/overlaynet/overlay/cnirpc"
	"github.com/overlaynet/overlay/overlay"
)

// namePrefix starts every namespace a Net creates.
const namePrefix = "ovs"

// readyPoll is how often WaitReady asks overlayd for its status; short,
// so that start-up time is measured to a few milliseconds.
const readyPoll = 5 * time.Millisecond

// Underlay and overlay ranges: benchmarking ranges (RFC 2544), never
// routed anywhere.
var (
	UnderlayCIDR = netip.MustParsePrefix("198.18.0.0/24")
	OverlayCIDR  = netip.MustParsePrefix("198.19.0.0/16")
	// defaultGateway is an address of the underlay nobody holds: the
	// hosts' default route points at it so that overlayd can find its
	// underlay the way it does on a real host. Nothing answers it.
	defaultGateway = netip.MustParseAddr("198.18.0.254")
)

// Options configure a Net.
type Options struct {
	// Hosts is the number of simulated hosts.
	Hosts int
	// Overlayd and CNI are the paths of the binaries (see Build).
	Overlayd, CNI string
	// Network is the overlay network; the zero value means "default" on
	// OverlayCIDR with /26 blocks.
	Network overlay.Network
	// Logs, when set, receives every overlayd's output; otherwise it goes
	// to a file per host in the run's directory.
	Logs io.Writer
}

// Net is a set of simulated hosts on a shared underlay.
type Net struct {
	// Prefix starts every namespace name of this run.
	Prefix string
	// Dir holds the hosts' data directories, sockets, logs and CNI files.
	Dir string
	// Underlay is the namespace holding the underlay bridge.
	Underlay string
	// Hosts are the simulated hosts.
	Hosts []*Host
	// Network is the overlay network.
	Network overlay.Network

	opts Options

	mu         sync.Mutex // guards the fields below
	namespaces []string
	closed     bool

	stopSignals func()
}

// Host is one simulated host.
type Host struct {
	// Name is its namespace.
	Name string
	// Index counts hosts from 1.
	Index int
	// Underlay is its underlay address.
	Underlay netip.Addr
	// DataDir is its overlayd's data directory.
	DataDir string
	// Socket is its overlayd's CNI socket.
	Socket string
	// Extra are flags added to its overlayd's command line (Args).
	Extra []string
	// Env are environment variables ("NAME=value") added to its
	// overlayd's, such as systemd's NOTIFY_SOCKET.
	Env []string

	n        *Net
	mu       sync.Mutex // guards cmd and done
	cmd      *exec.Cmd
	done     chan error
	logFile  *os.File
	embedded bool
}

// New creates the underlay and n hosts (without starting overlayd). On
// error, whatever was created is removed.
func New(ctx context.Context, opts Options) (_ *Net, err error) {
	if os.Geteuid() != 0 {
		return nil, errors.New("simnet needs root (network namespaces, veth, VXLAN)")
	}
	if opts.Hosts < 1 || opts.Hosts > 200 {
		return nil, fmt.Errorf("simnet: %d hosts: want 1 to 200", opts.Hosts)
	}
	if opts.Network.Name == "" {
		opts.Network = overlay.Network{Name: "default", CIDR: OverlayCIDR, BlockBits: overlay.DefaultBlockBits, VNI: overlay.DefaultVNI, Port: overlay.DefaultPort}
	}
	SweepStale()
	prefix := fmt.Sprintf("%s%d-", namePrefix, os.Getpid())
	dir, err := os.MkdirTemp("", prefix)
	if err != nil {
		return nil, err
	}
	n := &Net{Prefix: prefix, Dir: dir, Underlay: prefix + "u", Network: opts.Network, opts: opts}
	defer func() {
		if err != nil {
			n.Close()
		}
	}()
	n.stopSignals = n.closeOnSignal()

	// Every host encrypts gossip with one key of this run.
	key := make([]byte, 32)
	rand.Read(key)
	if err := os.WriteFile(n.GossipKeyFile(), []byte(base64.StdEncoding.EncodeToString(key)+"\n"), 0o600); err != nil {
		return nil, err
	}
	if err := n.addNS(ctx, n.Underlay); err != nil {
		return nil, err
	}
	if err := run(ctx, "ip", "-n", n.Underlay, "link", "add", "br0", "type", "bridge"); err != nil {
		return nil, err
	}
	if err := run(ctx, "ip", "-n", n.Underlay, "link", "set", "br0", "up"); err != nil {
		return nil, err
	}
	for i := 1; i <= opts.Hosts; i++ {
		h, err := n.addHost(ctx, i)
		if err != nil {
			return nil, err
		}
		n.Hosts = append(n.Hosts, h)
	}
	return n, nil
}

func (n *Net) addNS(ctx context.Context, name string) error {
	if err := run(ctx, "ip", "netns", "add", name); err != nil {
		return err
	}
	n.mu.Lock()
	n.namespaces = append(n.namespaces, name)
	n.mu.Unlock()
	return run(ctx, "ip", "-n", name, "link", "set", "lo", "up")
}

func (n *Net) addHost(ctx context.Context, i int) (*Host, error) {
	h := &Host{
		Name:     fmt.Sprintf("%sh%d", n.Prefix, i),
		Index:    i,
		Underlay: netip.AddrFrom4([4]byte{198, 18, 0, byte(i)}),
		DataDir:  filepath.Join(n.Dir, fmt.Sprintf("h%d", i)),
		n:        n,
		embedded: i == 1,
	}
	h.Socket = filepath.Join(h.DataDir, "overlayd.sock")
	if err := os.MkdirAll(h.DataDir, 0o700); err != nil {
		return nil, err
	}
	if err := n.addNS(ctx, h.Name); err != nil {
		return nil, err
	}
	port := fmt.Sprintf("p%d", i)
	steps := [][]string{
		// The veth is born in the underlay namespace with its peer inside
		// the host: it never exists in the root namespace.
		{"ip", "-n", n.Underlay, "link", "add", port, "type", "veth", "peer", "name", "eth0", "netns", h.Name},
		{"ip", "-n", n.Underlay, "link", "set", port, "master", "br0", "up"},
		{"ip", "-n", h.Name, "addr", "add", netip.PrefixFrom(h.Underlay, UnderlayCIDR.Bits()).String(), "dev", "eth0"},
		{"ip", "-n", h.Name, "link", "set", "eth0", "up"},
		{"ip", "-n", h.Name, "route", "add", "default", "via", defaultGateway.String(), "dev", "eth0"},
	}
	for _, s := range steps {
		if err := run(ctx, s[0], s[1:]...); err != nil {
			return nil, err
		}
	}
	return h, nil
}

// EtcdSocket is the Unix socket of the embedded etcd that host 1's
// overlayd runs and every other host uses. A Unix socket is reachable
// from every namespace, and sends nothing over any network.
func (n *Net) EtcdSocket() string { return filepath.Join(n.Dir, "etcd.sock") }

// GossipKeyFile is the gossip key file every host of the run uses.
func (n *Net) GossipKeyFile() string { return filepath.Join(n.Dir, "gossip.keys") }

// EtcdEndpoint is the etcd client URL of EtcdSocket.
func (n *Net) EtcdEndpoint() string { return "unix://" + n.EtcdSocket() }

// Args returns the overlayd command line of host h.
func (h *Host) Args() []string {
	n := h.n
	args := []string{
		"--data-dir", h.DataDir,
		"--socket", h.Socket,
		"--network", n.Network.Name,
		"--network-cidr", n.Network.CIDR.String(),
		"--block-bits", strconv.Itoa(n.Network.BlockBits),
		"--vni", strconv.Itoa(int(n.Network.VNI)),
		"--resync-interval", "2s",
		"--orphan-grace", "500ms",
		"--gossip-key-file", n.GossipKeyFile(),
		// The hosts share the machine's file system: each its own.
		"--docker-plugin-socket", h.DockerSocket(),
		"--docker-sweep-interval", "1s",
	}
	if h.embedded {
		args = append(args,
			"--embedded-etcd-client-url", n.EtcdEndpoint(),
			"--embedded-etcd-peer-url", "unix://"+filepath.Join(n.Dir, "etcd-peer.sock"))
	} else {
		args = append(args, "--etcd-endpoints", n.EtcdEndpoint())
	}
	return append(args, h.Extra...)
}

// DockerSocket is where the host's overlayd serves Docker's plugin
// protocols: the host's plugins directory, which its dockerd sees as
// /run/docker/plugins.
func (h *Host) DockerSocket() string { return filepath.Join(h.DataDir, "plugins", "overlaynet.sock") }

// Start starts overlayd in the host's namespace and waits until it
// answers on its socket.
func (h *Host) Start(ctx context.Context) error {
	h.mu.Lock()
	if h.cmd != nil {
		h.mu.Unlock()
		return fmt.Errorf("%s: overlayd already running", h.Name)
	}
	out := h.n.opts.Logs
	if out == nil {
		if h.logFile == nil {
			f, err := os.OpenFile(filepath.Join(h.DataDir, "overlayd.log"), os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o600)
			if err != nil {
				h.mu.Unlock()
				return err
			}
			h.logFile = f
		}
		out = h.logFile
	}
	cmd := exec.Command("ip", append([]string{"netns", "exec", h.Name, h.n.opts.Overlayd}, h.Args()...)...)
	cmd.Stdout, cmd.Stderr = out, out
	if len(h.Env) > 0 {
		cmd.Env = append(os.Environ(), h.Env...)
	}
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	if err := cmd.Start(); err != nil {
		h.mu.Unlock()
		return fmt.Errorf("%s: start overlayd: %w", h.Name, err)
	}
	done := make(chan error, 1)
	go func() { done <- cmd.Wait() }()
	h.cmd, h.done = cmd, done
	h.mu.Unlock()
	return h.WaitReady(ctx)
}

// WaitReady waits until overlayd answers STATUS as ready for the run's
// network, or fails when it exits first.
func (h *Host) WaitReady(ctx context.Context) error { return h.WaitNetwork(ctx, h.n.Network.Name) }

// WaitNetwork waits until overlayd answers STATUS as ready for network,
// or fails when it exits first, or after a minute.
func (h *Host) WaitNetwork(ctx context.Context, network string) error {
	ctx, cancel := context.WithTimeout(ctx, 60*time.Second)
	defer cancel()
	c := cnirpc.NewClient(h.Socket)
	for {
		st, err := c.Status(ctx, network)
		if err == nil && st.Ready {
			return nil
		}
		h.mu.Lock()
		done := h.done
		h.mu.Unlock()
		select {
		case werr := <-done:
			h.mu.Lock()
			h.cmd, h.done = nil, nil
			h.mu.Unlock()
			return fmt.Errorf("%s: overlayd exited before it was ready (%v); its log is in %s", h.Name, werr, h.DataDir)
		case <-ctx.Done():
			return fmt.Errorf("%s: overlayd not ready for network %s (last: %+v, %v): %w", h.Name, network, st, err, ctx.Err())
		case <-time.After(readyPoll):
		}
	}
}

// Pid returns the process ID of the host's running overlayd, or 0.
func (h *Host) Pid() int {
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.cmd == nil || h.cmd.Process == nil {
		return 0
	}
	return h.cmd.Process.Pid
}

// Stop sends overlayd SIGTERM and waits for it to exit.
func (h *Host) Stop() error {
	cmd, done := h.take()
	if cmd == nil {
		return nil
	}
	_ = syscall.Kill(-cmd.Process.Pid, syscall.SIGTERM)
	select {
	case err := <-done:
		var ee *exec.ExitError
		if err != nil && !errors.As(err, &ee) {
			return err
		}
		if ee != nil && !ee.Exited() {
			return nil // ended by the signal
		}
		if ee != nil {
			return fmt.Errorf("%s: overlayd exited with %d after SIGTERM", h.Name, ee.ExitCode())
		}
		return nil
	case <-time.After(15 * time.Second):
		_ = syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL)
		<-done
		return fmt.Errorf("%s: overlayd ignored SIGTERM for 15s; killed", h.Name)
	}
}

// take returns the running overlayd and its exit channel, nil when none
// runs, and forgets them: the caller ends it.
func (h *Host) take() (*exec.Cmd, chan error) {
	h.mu.Lock()
	defer h.mu.Unlock()
	cmd, done := h.cmd, h.done
	h.cmd, h.done = nil, nil
	return cmd, done
}

// Kill ends overlayd with SIGKILL, as a crash or a power cut would: it
// cleans nothing up, and its liveness lease runs out in etcd.
func (h *Host) Kill() error {
	cmd, done := h.take()
	if cmd == nil {
		return nil
	}
	if err := syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL); err != nil {
		return fmt.Errorf("%s: kill overlayd: %w", h.Name, err)
	}
	<-done
	return nil
}

// Teardown runs "overlayd teardown" in the host's namespace: the host
// leaves the overlay for good. overlayd must be stopped.
func (h *Host) Teardown(ctx context.Context) error {
	out, err := h.Exec(ctx, append([]string{h.n.opts.Overlayd, "teardown"}, h.Args()...)...)
	if err != nil {
		return fmt.Errorf("%s: teardown: %w: %s", h.Name, err, out)
	}
	return nil
}

// Exec runs a command in the host's namespace and returns its combined
// output.
func (h *Host) Exec(ctx context.Context, args ...string) ([]byte, error) {
	return output(ctx, "ip", append([]string{"netns", "exec", h.Name}, args...)...)
}

// Close stops every overlayd, removes every namespace the run created and
// its directory. It is safe to call more than once.
func (n *Net) Close() error {
	n.mu.Lock()
	if n.closed {
		n.mu.Unlock()
		return nil
	}
	n.closed = true
	namespaces := n.namespaces
	n.mu.Unlock()
	if n.stopSignals != nil {
		n.stopSignals()
	}
	var errs []error
	for _, h := range n.Hosts {
		if err := h.Stop(); err != nil {
			errs = append(errs, err)
		}
		if h.logFile != nil {
			h.logFile.Close()
		}
	}
	for i := len(namespaces) - 1; i >= 0; i-- {
		errs = append(errs, deleteNS(namespaces[i]))
	}
	if os.Getenv("SIMNET_KEEP_DIR") == "" {
		errs = append(errs, os.RemoveAll(n.Dir))
	}
	return errors.Join(errs...)
}

// closeOnSignal removes everything when the process is interrupted, then
// exits; the returned func stops watching.
func (n *Net) closeOnSignal() func() {
	ch := make(chan os.Signal, 1)
	signal.Notify(ch, syscall.SIGINT, syscall.SIGTERM, syscall.SIGHUP)
	stop := make(chan struct{})
	var once sync.Once
	go func() {
		select {
		case sig := <-ch:
			fmt.Fprintf(os.Stderr, "simnet: %v: removing namespaces %s*\n", sig, n.Prefix)
			n.Close()
			os.Exit(130)
		case <-stop:
		}
	}()
	return func() {
		once.Do(func() {
			signal.Stop(ch)
			close(stop)
		})
	}
}

// deleteNS kills every process left in the namespace, then deletes it.
func deleteNS(name string) error {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if out, err := output(ctx, "ip", "netns", "pids", name); err == nil {
		for _, f := range strings.Fields(string(out)) {
			if pid, err := strconv.Atoi(f); err == nil {
				_ = syscall.Kill(pid, syscall.SIGKILL)
			}
		}
	}
	if err := run(ctx, "ip", "netns", "delete", name); err != nil {
		if _, statErr := os.Stat(filepath.Join("/run/netns", name)); errors.Is(statErr, os.ErrNotExist) {
			return nil
		}
		return err
	}
	return nil
}

// SweepStale removes the namespaces of earlier runs whose process is gone
// (a run that was killed before it could clean up).
func SweepStale() {
	entries, err := os.ReadDir("/run/netns")
	if err != nil {
		return
	}
	for _, e := range entries {
		name := e.Name()
		rest, ok := strings.CutPrefix(name, namePrefix)
		if !ok {
			continue
		}
		pidText, _, ok := strings.Cut(rest, "-")
		pid, err := strconv.Atoi(pidText)
		if !ok || err != nil || pid == os.Getpid() {
			continue
		}
		if syscall.Kill(pid, 0) == nil {
			continue // its run is still going
		}
		_ = deleteNS(name)
	}
	// And the directories of runs that are gone.
	dirs, _ := filepath.Glob(filepath.Join(os.TempDir(), namePrefix+"*-*"))
	for _, d := range dirs {
		pidText, _, _ := strings.Cut(strings.TrimPrefix(filepath.Base(d), namePrefix), "-")
		pid, err := strconv.Atoi(pidText)
		if err != nil || pid == os.Getpid() || syscall.Kill(pid, 0) == nil {
			continue
		}
		_ = os.RemoveAll(d)
	}
}

func run(ctx context.Context, name string, args ...string) error {
	_, err := output(ctx, name, args...)
	return err
}

func output(ctx context.Context, name string, args ...string) ([]byte, error) {
	var buf bytes.Buffer
	cmd := exec.CommandContext(ctx, name, args...)
	cmd.Stdout, cmd.Stderr = &buf, &buf
	if err := cmd.Run(); err != nil {
		return buf.Bytes(), fmt.Errorf("%s %s: %w: %s", name, strings.Join(args, " "), err, bytes.TrimSpace(buf.Bytes()))
	}
	return buf.Bytes(), nil
}

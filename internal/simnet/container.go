package simnet

import (
	"context"
	"fmt"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"

	"github.com/containernetworking/cni/libcni"
	"github.com/containernetworking/cni/pkg/types"
	current "github.com/containernetworking/cni/pkg/types/100"
	"github.com/vishvananda/netns"
)

// Container is a network namespace attached to the overlay through the
// overlay-cni plugin.
type Container struct {
	// ID is the CNI container ID.
	ID string
	// Name is its namespace.
	Name string
	// Host is the host it runs on.
	Host *Host
	// Addr is the address the plugin gave it.
	Addr netip.Prefix
	// Result is the plugin's ADD result.
	Result *current.Result
	// CapabilityArgs are passed to the plugins as runtimeConfig, for the
	// capabilities their configuration declares ("ips", "mac").
	CapabilityArgs map[string]any
	// Args are the CNI_ARGS pairs.
	Args [][2]string
	// IfName is the interface name inside the container; "" means eth0.
	IfName string
	// ConfList, when set, replaces the host's CNIConfList for this
	// container, for example to chain other plugins after overlay-cni.
	ConfList []byte
}

// NetNSPath returns the path of the container's namespace.
func (c *Container) NetNSPath() string { return filepath.Join("/run/netns", c.Name) }

// CNIConfList returns the network configuration list the host's runtime
// would use: overlay-cni alone, talking to this host's overlayd.
func (h *Host) CNIConfList() []byte {
	return fmt.Appendf(nil, `{"cniVersion":"1.1.0","name":"overlay","plugins":[{"type":"overlay-cni","network":%q,"socket":%q,"capabilities":{"ips":true,"mac":true}}]}`,
		h.n.Network.Name, h.Socket)
}

// NetworkConfList returns the configuration list of overlay-cni alone for
// overlay network network, named "overlay-<network>".
func (h *Host) NetworkConfList(network string) []byte {
	return fmt.Appendf(nil, `{"cniVersion":"1.1.0","name":"overlay-%s","plugins":[{"type":"overlay-cni","network":%q,"socket":%q}]}`,
		network, network, h.Socket)
}

// Join attaches container c to another network, as interface ifname, and
// returns the container interface as a Container of its own (same ID and
// namespace) for DelContainer and CheckContainer.
func (n *Net) Join(ctx context.Context, c *Container, network, ifname string) (*Container, error) {
	j := &Container{ID: c.ID, Name: c.Name, Host: c.Host, IfName: ifname, ConfList: c.Host.NetworkConfList(network)}
	if err := n.Attach(ctx, j); err != nil {
		return nil, err
	}
	return j, nil
}

// AddContainerOn creates a namespace on host h and attaches it to overlay
// network network as eth0.
func (n *Net) AddContainerOn(ctx context.Context, h *Host, id, network string) (*Container, error) {
	c, err := n.NewContainer(ctx, h, id)
	if err != nil {
		return nil, err
	}
	c.ConfList = h.NetworkConfList(network)
	if err := n.Attach(ctx, c); err != nil {
		return nil, err
	}
	return c, nil
}

// Ctl runs overlayctl, built beside overlayd, in the namespace of the
// first host against the run's etcd, and returns its combined output.
func (n *Net) Ctl(ctx context.Context, args ...string) ([]byte, error) {
	ctl := filepath.Join(filepath.Dir(n.opts.Overlayd), "overlayctl")
	args = append([]string{"--etcd-endpoints", n.EtcdEndpoint()}, args...)
	return n.Hosts[0].Exec(ctx, append([]string{ctl}, args...)...)
}

// Ctl runs overlayctl in the host's namespace, against the run's etcd
// and the host's overlayd socket, and returns its combined output.
func (h *Host) Ctl(ctx context.Context, args ...string) ([]byte, error) {
	ctl := filepath.Join(filepath.Dir(h.n.opts.Overlayd), "overlayctl")
	args = append([]string{"--etcd-endpoints", h.n.EtcdEndpoint(), "--socket", h.Socket}, args...)
	return h.Exec(ctx, append([]string{ctl}, args...)...)
}

// ChainConfList returns a configuration list that chains the reference
// portmap and bandwidth plugins after overlay-cni, as the CNI checklist
// asks (see BuildTools).
func (h *Host) ChainConfList() []byte {
	return fmt.Appendf(nil, `{"cniVersion":"1.1.0","name":"overlay","plugins":[
{"type":"overlay-cni","network":%q,"socket":%q,"capabilities":{"ips":true,"mac":true}},
{"type":"portmap","capabilities":{"portMappings":true}},
{"type":"bandwidth","capabilities":{"bandwidth":true}}]}`, h.n.Network.Name, h.Socket)
}

// CNI returns a libcni client whose plugins run in the host's namespace,
// as a runtime on that host would run them, with a cache directory
// private to the run.
func (h *Host) CNI() (*libcni.CNIConfig, *libcni.NetworkConfigList, error) {
	return h.cni(h.CNIConfList())
}

func (h *Host) cni(conflist []byte) (*libcni.CNIConfig, *libcni.NetworkConfigList, error) {
	list, err := libcni.ConfListFromBytes(conflist)
	if err != nil {
		return nil, nil, err
	}
	cni := libcni.NewCNIConfigWithCacheDir([]string{filepath.Dir(h.n.opts.CNI)}, filepath.Join(h.n.Dir, "cni-cache"), nil)
	return cni, list, nil
}

// Status runs the CNI STATUS verb for the host's network through libcni.
func (h *Host) Status(ctx context.Context) error {
	cni, list, err := h.CNI()
	if err != nil {
		return err
	}
	return h.InNS(func() error { return cni.GetStatusNetworkList(ctx, list) })
}

// GC runs the CNI GC verb on host h through libcni, with valid as the
// attachments still in use.
func (h *Host) GC(ctx context.Context, valid ...*Container) error {
	cni, list, err := h.CNI()
	if err != nil {
		return err
	}
	args := &libcni.GCArgs{ValidAttachments: []types.GCAttachment{}}
	for _, c := range valid {
		args.ValidAttachments = append(args.ValidAttachments, types.GCAttachment{ContainerID: c.ID, IfName: "eth0"})
	}
	return h.InNS(func() error { return cni.GCNetworkList(ctx, list, args) })
}

// cni returns the libcni client and configuration list of c.
func (c *Container) cni() (*libcni.CNIConfig, *libcni.NetworkConfigList, error) {
	if c.ConfList != nil {
		return c.Host.cni(c.ConfList)
	}
	return c.Host.CNI()
}

// RuntimeConf returns the runtime configuration of container c.
func (c *Container) RuntimeConf() *libcni.RuntimeConf {
	ifname := c.IfName
	if ifname == "" {
		ifname = "eth0"
	}
	return &libcni.RuntimeConf{ContainerID: c.ID, NetNS: c.NetNSPath(), IfName: ifname, CapabilityArgs: c.CapabilityArgs, Args: c.Args}
}

// AddContainer creates a namespace on host h and attaches it with the
// plugin through libcni.
func (n *Net) AddContainer(ctx context.Context, h *Host, id string) (*Container, error) {
	c, err := n.NewContainer(ctx, h, id)
	if err != nil {
		return nil, err
	}
	if err := n.Attach(ctx, c); err != nil {
		return nil, err
	}
	return c, nil
}

// NewContainer creates the namespace of a container on host h without
// attaching it.
func (n *Net) NewContainer(ctx context.Context, h *Host, id string) (*Container, error) {
	c := &Container{ID: id, Name: n.Prefix + id, Host: h}
	if err := n.addNS(ctx, c.Name); err != nil {
		return nil, err
	}
	return c, nil
}

// Attach runs ADD for c through libcni and records the result.
func (n *Net) Attach(ctx context.Context, c *Container) error {
	cni, list, err := c.cni()
	if err != nil {
		return err
	}
	var res *current.Result
	err = c.Host.InNS(func() error {
		r, err := cni.AddNetworkList(ctx, list, c.RuntimeConf())
		if err != nil {
			return err
		}
		res, err = current.NewResultFromResult(r)
		return err
	})
	if err != nil {
		return fmt.Errorf("ADD %s on %s: %w", c.ID, c.Host.Name, err)
	}
	if len(res.IPs) == 0 {
		return fmt.Errorf("ADD %s: result has no address", c.ID)
	}
	a, _ := netip.AddrFromSlice(res.IPs[0].Address.IP)
	ones, _ := res.IPs[0].Address.Mask.Size()
	c.Result = res
	c.Addr = netip.PrefixFrom(a.Unmap(), ones)
	return nil
}

// CheckContainer runs CHECK on c through libcni.
func (n *Net) CheckContainer(ctx context.Context, c *Container) error {
	cni, list, err := c.cni()
	if err != nil {
		return err
	}
	return c.Host.InNS(func() error { return cni.CheckNetworkList(ctx, list, c.RuntimeConf()) })
}

// RemoveNetNS deletes the container's namespace, as a runtime does when
// the container is gone, without telling the plugin.
func (c *Container) RemoveNetNS(ctx context.Context) error {
	return run(ctx, "ip", "netns", "delete", c.Name)
}

// DelContainer detaches c through libcni (the namespace stays).
func (n *Net) DelContainer(ctx context.Context, c *Container) error {
	cni, list, err := c.cni()
	if err != nil {
		return err
	}
	return c.Host.InNS(func() error { return cni.DelNetworkList(ctx, list, c.RuntimeConf()) })
}

// Exec runs a command in the container's namespace.
func (c *Container) Exec(ctx context.Context, args ...string) ([]byte, error) {
	return output(ctx, "ip", append([]string{"netns", "exec", c.Name}, args...)...)
}

// Ping sends count pings to addr from the container, 0.2s apart, and
// fails unless every one is answered.
func (c *Container) Ping(ctx context.Context, addr netip.Addr, count int) error {
	out, err := c.Exec(ctx, "ping", "-c", strconv.Itoa(count), "-i", "0.2", "-W", "2", addr.String())
	if err != nil {
		return fmt.Errorf("ping %s from %s: %w", addr, c.ID, err)
	}
	if !strings.Contains(string(out), " 0% packet loss") {
		return fmt.Errorf("ping %s from %s: %s", addr, c.ID, out)
	}
	return nil
}

// Listen opens a TCP listener inside the container's namespace. The
// socket stays in that namespace whichever goroutine uses it.
func (c *Container) Listen(port int) (net.Listener, error) {
	var l net.Listener
	err := inNamespace(c.NetNSPath(), func() error {
		var err error
		l, err = net.Listen("tcp4", netip.AddrPortFrom(c.Addr.Addr(), uint16(port)).String())
		return err
	})
	return l, err
}

// Dial connects from inside the container's namespace.
func (c *Container) Dial(ctx context.Context, addr netip.AddrPort) (net.Conn, error) {
	var conn net.Conn
	err := inNamespace(c.NetNSPath(), func() error {
		var err error
		var d net.Dialer
		conn, err = d.DialContext(ctx, "tcp4", addr.String())
		return err
	})
	return conn, err
}

// InNS runs fn on an OS thread inside the host's namespace: sockets it
// opens and processes it starts belong to the host, as a runtime's would.
func (h *Host) InNS(fn func() error) error {
	return inNamespace(filepath.Join("/run/netns", h.Name), fn)
}

// inNamespace runs fn with the calling goroutine locked to a thread that
// has entered the namespace at path. A thread whose namespace cannot be
// restored stays locked, so the runtime discards it with the goroutine.
func inNamespace(path string, fn func() error) error {
	target, err := netns.GetFromPath(path)
	if err != nil {
		return fmt.Errorf("open namespace %s: %w", path, err)
	}
	defer target.Close()
	errc := make(chan error, 1)
	go func() {
		runtime.LockOSThread()
		origin, err := netns.Get()
		if err != nil {
			errc <- err
			return
		}
		defer origin.Close()
		if err := netns.Set(target); err != nil {
			errc <- fmt.Errorf("enter namespace %s: %w", path, err)
			return
		}
		ferr := fn()
		if err := netns.Set(origin); err != nil {
			errc <- fmt.Errorf("leave namespace %s: %w (after %v)", path, err, ferr)
			return // the thread stays locked and dies with the goroutine
		}
		runtime.UnlockOSThread()
		errc <- ferr
	}()
	return <-errc
}

// Binaries are the programs a run uses, in one directory (the CNI path).
type Binaries struct {
	// Dir holds them all.
	Dir string
	// Overlayd and CNI are the paths of overlayd and overlay-cni.
	Overlayd, CNI string
}

// ToolsDirEnv names the environment variable that points BuildAll at a
// directory already holding the tools BuildTools would build, so that a
// run that built them once (scripts/test) does not build them again.
const ToolsDirEnv = "SIMNET_TOOLS_DIR"

// BuildAll compiles overlayd and overlay-cni, and with tools the pinned
// reference plugins and cnitool too (BuildTools, or LinkTools from the
// directory $SIMNET_TOOLS_DIR when it is set), into a new directory named
// for this run, so that SweepStale removes it if the run is killed.
// Remove deletes it.
func BuildAll(ctx context.Context, tools bool) (Binaries, error) {
	dir, err := os.MkdirTemp("", fmt.Sprintf("%s%d-bin-", namePrefix, os.Getpid()))
	if err != nil {
		return Binaries{}, err
	}
	b := Binaries{Dir: dir}
	b.Overlayd, b.CNI, err = Build(ctx, dir)
	if err == nil && tools {
		if from := os.Getenv(ToolsDirEnv); from != "" {
			err = LinkTools(from, dir)
		} else {
			err = BuildTools(ctx, dir)
		}
	}
	if err != nil {
		b.Remove()
		return Binaries{}, err
	}
	return b, nil
}

// LinkTools links every file of the directory from, where BuildTools or
// the equivalent `go -C tools build -o from/ tool` put the tools, into
// dir by a symbolic link of the same name. A name dir already holds is an
// error: the tools must not shadow overlayd or overlay-cni.
func LinkTools(from, dir string) error {
	from, err := filepath.Abs(from)
	if err != nil {
		return fmt.Errorf("link the tools: %w", err)
	}
	entries, err := os.ReadDir(from)
	if err != nil {
		return fmt.Errorf("link the tools: %w", err)
	}
	if len(entries) == 0 {
		return fmt.Errorf("link the tools: %s is empty (unset %s to build them)", from, ToolsDirEnv)
	}
	for _, e := range entries {
		if err := os.Symlink(filepath.Join(from, e.Name()), filepath.Join(dir, e.Name())); err != nil {
			return fmt.Errorf("link the tools: %w", err)
		}
	}
	return nil
}

// Remove deletes the binaries' directory.
func (b Binaries) Remove() error { return os.RemoveAll(b.Dir) }

// RaceEnv names the environment variable that, when set, makes Build
// compile overlayd with the race detector, so that the end-to-end tests
// run the daemon's goroutines under it; a race it finds is in the host's
// overlayd.log ("WARNING: DATA RACE").
const RaceEnv = "SIMNET_RACE"

// Build compiles overlayd, overlay-cni and overlayctl (static,
// CGO_ENABLED=0) into dir and returns the paths of the first two
// (overlayctl is beside overlayd). It runs from the module that holds this
// package.
func Build(ctx context.Context, dir string) (overlayd, cni string, err error) {
	root, err := ModuleRoot(ctx)
	if err != nil {
		return "", "", err
	}
	overlayd = filepath.Join(dir, "overlayd")
	cni = filepath.Join(dir, "overlay-cni")
	ctl := filepath.Join(dir, "overlayctl")
	for bin, pkg := range map[string]string{overlayd: "./cmd/overlayd", cni: "./cmd/overlay-cni", ctl: "./cmd/overlayctl"} {
		args, env := []string{"build", "-o", bin}, "CGO_ENABLED=0"
		if bin == overlayd && os.Getenv(RaceEnv) != "" {
			args, env = append(args, "-race"), "CGO_ENABLED=1"
		}
		cmd := exec.CommandContext(ctx, "go", append(args, pkg)...)
		cmd.Dir = root
		cmd.Env = append(os.Environ(), env)
		if out, err := cmd.CombinedOutput(); err != nil {
			return "", "", fmt.Errorf("build %s: %w: %s", pkg, err, out)
		}
	}
	return overlayd, cni, nil
}

// BuildTools compiles (static) every tool pinned in the tools module
// (tools/go.mod) into dir: the reference CNI plugins bridge, loopback,
// host-local, portmap and bandwidth, and cnitool.
func BuildTools(ctx context.Context, dir string) error {
	root, err := ModuleRoot(ctx)
	if err != nil {
		return err
	}
	cmd := exec.CommandContext(ctx, "go", "-C", filepath.Join(root, "tools"), "build", "-o", dir+"/", "tool")
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
	if out, err := cmd.CombinedOutput(); err != nil {
		return fmt.Errorf("build the reference plugins and cnitool: %w: %s", err, out)
	}
	return nil
}

// ModuleRoot returns the directory of the go command's main module (go
// env GOMOD), which tests and the bench run from: this repository.
func ModuleRoot(ctx context.Context) (string, error) {
	out, err := exec.CommandContext(ctx, "go", "env", "GOMOD").Output()
	if err != nil {
		return "", fmt.Errorf("find module root: %w", err)
	}
	gomod := strings.TrimSpace(string(out))
	if gomod == "" || gomod == os.DevNull {
		return "", fmt.Errorf("find module root: not inside the module")
	}
	return filepath.Dir(gomod), nil
}

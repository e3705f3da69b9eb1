package main

import (
	"context"
	"encoding/json"
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/overlaynet/overlay/internal/simnet"
)

// flannelConfig is flannel's network, on etcd under its default prefix:
// the vxlan backend with a VNI and port of its own, so that its device
// and the overlay's coexist on a host, and a range apart from the
// overlay's and the underlay's (flCIDR).
const (
	flannelPrefix = "/coreos.com/network"
	flannelConfig = `{"Network":"10.250.0.0/16","SubnetLen":24,"Backend":{"Type":"vxlan","VNI":42,"Port":8472}}`
)

var flCIDR = netip.MustParsePrefix("10.250.0.0/16")

// buildFlannel builds flanneld from tools/flannel (a module of its own)
// into dir.
func buildFlannel(ctx context.Context, dir string) (string, error) {
	root, err := simnet.ModuleRoot(ctx)
	if err != nil {
		return "", err
	}
	cmd := exec.CommandContext(ctx, "go", "-C", filepath.Join(root, "tools", "flannel"), "build", "-o", dir+"/", "tool")
	cmd.Env = append(os.Environ(), "CGO_ENABLED=1")
	if out, err := cmd.CombinedOutput(); err != nil {
		return "", fmt.Errorf("build flanneld: %w: %s", err, out)
	}
	return filepath.Join(dir, "flannel"), nil
}

// remoteRoutes counts the routes of the namespace's main table into
// cidr through a gateway: one per other host, for flannel and the
// overlay alike.
func remoteRoutes(h *netlink.Handle, cidr netip.Prefix) (int, error) {
	routes, err := h.RouteList(nil, netlink.FAMILY_V4)
	if err != nil {
		return 0, err
	}
	n := 0
	for _, r := range routes {
		if r.Dst == nil || r.Gw == nil {
			continue
		}
		dst, ok := netip.AddrFromSlice(r.Dst.IP.To4())
		if ok && cidr.Contains(dst) {
			n++
		}
	}
	return n, nil
}

// waitRoutes polls h every millisecond until it has want remote routes
// into cidr, and returns when that was first seen.
func waitRoutes(ctx context.Context, h *netlink.Handle, cidr netip.Prefix, want int) (time.Time, error) {
	ctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	for {
		n, err := remoteRoutes(h, cidr)
		if err != nil {
			return time.Time{}, err
		}
		if n == want {
			return time.Now(), nil
		}
		select {
		case <-ctx.Done():
			return time.Time{}, fmt.Errorf("waiting for %d routes into %s (have %d): %w", want, cidr, n, ctx.Err())
		case <-time.After(time.Millisecond):
		}
	}
}

// newHostProgrammed measures, sample by sample, how long a new host takes
// to be programmed on another: from the start of its daemon until host 1
// routes its addresses. The overlay's new host is host 3 after
// "overlayd teardown" (etcd forgets it); flannel's is flanneld on host 3
// after its lease is deleted. Hosts 1 and 2 run both throughout; host 3's
// overlayd must be running (it is torn down first).
func newHostProgrammed(ctx context.Context, net *simnet.Net, flanneld string, samples int) (ov, fl []time.Duration, err error) {
	h1, h2, h3 := net.Hosts[0], net.Hosts[1], net.Hosts[2]
	store, closeStore, err := net.Store(ctx)
	if err != nil {
		return nil, nil, err
	}
	defer closeStore()
	cli := store.Client()
	if _, err := cli.Put(ctx, flannelPrefix+"/config", flannelConfig); err != nil {
		return nil, nil, err
	}

	startFlannel := func(h *simnet.Host) (*exec.Cmd, error) {
		log, err := os.OpenFile(filepath.Join(h.DataDir, "flanneld.log"), os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o600)
		if err != nil {
			return nil, err
		}
		defer log.Close()
		cmd := exec.Command("ip", "netns", "exec", h.Name, flanneld,
			"--etcd-endpoints", net.EtcdEndpoint(), "--etcd-prefix", flannelPrefix,
			"--iface", "eth0", "--ip-masq=false", "--iptables-forward-rules=false",
			"--subnet-file", filepath.Join(h.DataDir, "flannel-subnet.env"))
		cmd.Stdout, cmd.Stderr = log, log
		cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
		return cmd, cmd.Start()
	}
	// stopFlannel kills flanneld: how it goes does not matter to a new
	// host, and it takes seconds to end on SIGTERM.
	stopFlannel := func(cmd *exec.Cmd) {
		_ = syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL)
		cmd.Wait()
	}
	// forgetFlannel deletes host 3's flannel lease, as for a host etcd
	// has never seen.
	forgetFlannel := func() error {
		resp, err := cli.Get(ctx, flannelPrefix+"/subnets/", clientv3.WithPrefix())
		if err != nil {
			return err
		}
		for _, kv := range resp.Kvs {
			var lease struct{ PublicIP string }
			if json.Unmarshal(kv.Value, &lease) == nil && lease.PublicIP == h3.Underlay.String() {
				if _, err := cli.Delete(ctx, string(kv.Key)); err != nil {
					return err
				}
			}
		}
		return nil
	}

	var running []*exec.Cmd
	defer func() {
		for _, c := range running {
			stopFlannel(c)
		}
	}()
	for _, h := range []*simnet.Host{h1, h2} {
		cmd, err := startFlannel(h)
		if err != nil {
			return nil, nil, err
		}
		running = append(running, cmd)
	}

	ns, err := netns.GetFromName(h1.Name)
	if err != nil {
		return nil, nil, err
	}
	defer ns.Close()
	nh, err := netlink.NewHandleAt(ns)
	if err != nil {
		return nil, nil, err
	}
	defer nh.Close()
	if _, err := waitRoutes(ctx, nh, flCIDR, 1); err != nil {
		return nil, nil, fmt.Errorf("flannel on hosts 1 and 2: %w\n%s", err, flannelLogTail(h2))
	}
	// Host 2's blocks: host 3 adds one.
	if err := h3.Stop(); err != nil {
		return nil, nil, err
	}
	if err := h3.Teardown(ctx); err != nil {
		return nil, nil, err
	}
	time.Sleep(time.Second) // host 1 removes host 3's routes
	base, err := remoteRoutes(nh, net.Network.CIDR)
	if err != nil {
		return nil, nil, err
	}

	// measure starts a daemon and returns how long host 1 took to route
	// it (one more remote route into cidr than base), watching from
	// before the start.
	measure := func(cidr netip.Prefix, base int, start func() error) (time.Duration, error) {
		type seen struct {
			at  time.Time
			err error
		}
		wctx, cancel := context.WithCancel(ctx)
		defer cancel()
		res := make(chan seen, 1)
		go func() {
			at, err := waitRoutes(wctx, nh, cidr, base+1)
			res <- seen{at, err}
		}()
		t0 := time.Now()
		if err := start(); err != nil {
			cancel()
			<-res // the poller is done with nh
			return 0, err
		}
		r := <-res
		return r.at.Sub(t0), r.err
	}
	for i := range samples {
		d, err := measure(net.Network.CIDR, base, func() error {
			// Start waits for the socket to answer: the route may come
			// before or after.
			return h3.Start(ctx)
		})
		if err != nil {
			return nil, nil, fmt.Errorf("overlay sample %d: %w", i, err)
		}
		ov = append(ov, d)
		if err := h3.Stop(); err != nil {
			return nil, nil, err
		}
		if err := h3.Teardown(ctx); err != nil {
			return nil, nil, err
		}
		if _, err := waitRoutes(ctx, nh, net.Network.CIDR, base); err != nil {
			return nil, nil, fmt.Errorf("overlay sample %d, after teardown: %w", i, err)
		}

		var cmd *exec.Cmd
		d, err = measure(flCIDR, 1, func() error {
			var err error
			cmd, err = startFlannel(h3)
			return err
		})
		if err != nil {
			if cmd != nil {
				stopFlannel(cmd)
			}
			return nil, nil, fmt.Errorf("flannel sample %d: %w\n%s", i, err, flannelLogTail(h3))
		}
		fl = append(fl, d)
		stopFlannel(cmd)
		if err := forgetFlannel(); err != nil {
			return nil, nil, err
		}
		if _, err := waitRoutes(ctx, nh, flCIDR, 1); err != nil {
			return nil, nil, fmt.Errorf("flannel sample %d, after its lease was deleted: %w", i, err)
		}
	}
	// Leave host 3 running, as the other cases expect.
	if err := h3.Start(ctx); err != nil {
		return nil, nil, err
	}
	return ov, fl, nil
}

// flannelLogTail returns the last lines of a host's flanneld log, for an
// error.
func flannelLogTail(h *simnet.Host) string {
	b, _ := os.ReadFile(filepath.Join(h.DataDir, "flanneld.log"))
	lines := strings.Split(strings.TrimSpace(string(b)), "\n")
	return strings.Join(lines[max(0, len(lines)-10):], "\n")
}

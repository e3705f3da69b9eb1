// Command bench measures the overlay on simulated hosts and prints the
// figures next to baselines measured in the same run, since this machine
// is too noisy for absolute numbers:
//
//   - a new host programmed on another (its daemon's start to the other's
//     route to it), against flanneld with its vxlan backend on the same
//     etcd (built from tools/flannel);
//   - overlayd start to ready, against a bare process start in a host's
//     namespace;
//   - container ADD and DEL through libcni, overlay-cni against the
//     reference bridge + host-local plugins on the same host;
//   - a bare exec of the plugin (VERSION), the floor of any CNI call;
//   - a network created at run time, usable on every host, against the
//     floor of an overlayctl command; 50 networks more on every host:
//     overlayd's memory and its reconcile passes.
//
// Usage: sudo go run ./bench [-n 20] [-new-host-only] [-networks-only]
package main

import (
	"bytes"
	"context"
	"flag"
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"sync"
	"time"

	"github.com/containernetworking/cni/libcni"
	current "github.com/containernetworking/cni/pkg/types/100"

	"github.com/overlaynet/overlay/cnirpc"
	"github.com/overlaynet/overlay/internal/simnet"
	"github.com/overlaynet/overlay/overlay"
)

func main() {
	n := flag.Int("n", 20, "samples per figure")
	newHostOnly := flag.Bool("new-host-only", false, "measure only a new host programmed on another, against flanneld")
	networksOnly := flag.Bool("networks-only", false, "measure only networks created at run time: usable everywhere, and 50 more on every host")
	dockerOnly := flag.Bool("docker-only", false, "measure only docker run with this driver, against --network none and Docker's bridge driver")
	flag.Parse()
	if err := run(*n, *newHostOnly, *networksOnly, *dockerOnly); err != nil {
		fmt.Fprintf(os.Stderr, "bench: %v\n", err)
		os.Exit(1)
	}
}

// refConf is the reference network: the bridge plugin with host-local
// IPAM, on a benchmarking range apart from the overlay's.
const refConf = `{"cniVersion":"1.1.0","name":"ref","plugins":[{"type":"bridge","bridge":"refbr0","isGateway":true,
"ipam":{"type":"host-local","subnet":"198.18.100.0/24","dataDir":%q}}]}`

func run(samples int, newHostOnly, networksOnly, dockerOnly bool) error {
	if os.Geteuid() != 0 {
		return fmt.Errorf("needs root: sudo go run ./bench")
	}
	ctx := context.Background()
	bins, err := simnet.BuildAll(ctx, true) // with the reference plugins
	if err != nil {
		return err
	}
	defer bins.Remove()
	overlayd, cni := bins.Overlayd, bins.CNI

	// The default /26 blocks: the burst and the concurrent ADDs cross
	// into new blocks, claimed as the host fills up.
	network := overlay.Network{Name: "default", CIDR: simnet.OverlayCIDR, BlockBits: overlay.DefaultBlockBits, VNI: overlay.DefaultVNI, Port: overlay.DefaultPort}
	net, err := simnet.New(ctx, simnet.Options{Hosts: 3, Overlayd: overlayd, CNI: cni, Network: network})
	if err != nil {
		return err
	}
	defer net.Close()
	h1, h2 := net.Hosts[0], net.Hosts[1]

	fmt.Printf("bench: %d samples per figure, %s\n\n", samples, time.Now().Format(time.RFC3339))
	if dockerOnly {
		if err := h1.Start(ctx); err != nil {
			return err
		}
		return dockerFigures(ctx, net, h1, samples)
	}
	if networksOnly {
		for _, h := range net.Hosts {
			if err := h.Start(ctx); err != nil {
				return err
			}
		}
		return networkFigures(ctx, net, samples)
	}

	// Start to ready.
	t := time.Now()
	if err := h1.Start(ctx); err != nil {
		return err
	}
	firstEmbedded := time.Since(t)
	var starts, floor []time.Duration
	for i := range samples {
		t := time.Now()
		if _, err := h2.Exec(ctx, "true"); err != nil {
			return err
		}
		floor = append(floor, time.Since(t))
		t = time.Now()
		if err := h2.Start(ctx); err != nil {
			return err
		}
		starts = append(starts, time.Since(t))
		if i < samples-1 {
			if err := h2.Stop(); err != nil {
				return err
			}
		}
	}
	// A new host programmed on another, against flannel.
	if err := net.Hosts[2].Start(ctx); err != nil {
		return err
	}
	flanneld, err := buildFlannel(ctx, bins.Dir)
	if err != nil {
		fmt.Printf("new host programmed on another: skipped, flanneld did not build: %v\n\n", err)
	} else {
		ov, fl, err := newHostProgrammed(ctx, net, flanneld, samples)
		if err != nil {
			return err
		}
		fmt.Println("new host programmed on another (its daemon's start to host 1's route to it)")
		report("overlayd", ov, fl, "flanneld (vxlan, same etcd)")
		fmt.Println()
	}
	if newHostOnly {
		return nil
	}

	fmt.Println("overlayd start to ready (socket answers STATUS ready)")
	fmt.Printf("  host 1, first start, embedded etcd:  %s\n", firstEmbedded.Round(time.Millisecond))
	report("host 2, etcd over a Unix socket", starts, floor, "bare `ip netns exec true`")

	// Start to ready with two registered hosts that are gone, against
	// none, pair by pair.
	clean, dead, err := deadHostStarts(ctx, net, h2, samples)
	if err != nil {
		return err
	}
	fmt.Println("overlayd restart to ready, with two registered hosts that no longer exist")
	report("two dead hosts registered", dead, clean, "no dead host")

	// CNI ADD and DEL: interleave the two plugins so they share the noise.
	_, ovList, err := h2.CNI()
	if err != nil {
		return err
	}
	refList, err := libcni.ConfListFromBytes(fmt.Appendf(nil, refConf, filepath.Join(net.Dir, "host-local")))
	if err != nil {
		return err
	}
	cfg := libcni.NewCNIConfigWithCacheDir([]string{bins.Dir}, filepath.Join(net.Dir, "cni-cache"), nil)
	var ovAdd, ovDel, refAdd, refDel, bare []time.Duration
	for i := range samples {
		for _, p := range []struct {
			list     *libcni.NetworkConfigList
			add, del *[]time.Duration
			name     string
		}{{ovList, &ovAdd, &ovDel, "ov"}, {refList, &refAdd, &refDel, "ref"}} {
			c, err := net.NewContainer(ctx, h2, fmt.Sprintf("%s%d", p.name, i))
			if err != nil {
				return err
			}
			rt := c.RuntimeConf()
			err = h2.InNS(func() error {
				t := time.Now()
				if _, err := cfg.AddNetworkList(ctx, p.list, rt); err != nil {
					return fmt.Errorf("ADD %s: %w", p.name, err)
				}
				*p.add = append(*p.add, time.Since(t))
				t = time.Now()
				if err := cfg.DelNetworkList(ctx, p.list, rt); err != nil {
					return fmt.Errorf("DEL %s: %w", p.name, err)
				}
				*p.del = append(*p.del, time.Since(t))
				return nil
			})
			if err != nil {
				return err
			}
		}
		t := time.Now()
		v := exec.Command(cni)
		v.Env = []string{"CNI_COMMAND=VERSION"}
		if out, err := v.Output(); err != nil {
			return fmt.Errorf("VERSION: %w: %s", err, out)
		}
		bare = append(bare, time.Since(t))
	}
	// overlayd's share: the socket request alone, answered once the
	// allocation is on disk, or early (the plugin's way) with the
	// confirmation after.
	var rpcAdd, rpcEarly, rpcDel []time.Duration
	client := cnirpc.NewClient(h2.Socket)
	for i := range samples {
		req := cnirpc.Request{Network: net.Network.Name, ContainerID: fmt.Sprintf("rpc%d", i), IfName: "eth0"}
		t := time.Now()
		if _, err := client.Add(ctx, req); err != nil {
			return err
		}
		rpcAdd = append(rpcAdd, time.Since(t))
		t = time.Now()
		if err := client.Del(ctx, req); err != nil {
			return err
		}
		rpcDel = append(rpcDel, time.Since(t))
		req.ContainerID = fmt.Sprintf("early%d", i)
		t = time.Now()
		_, pending, err := client.AddEarly(ctx, req)
		if err != nil {
			return err
		}
		rpcEarly = append(rpcEarly, time.Since(t))
		err = pending.Wait()
		pending.Close()
		if err != nil {
			return err
		}
		if err := client.Del(ctx, req); err != nil {
			return err
		}
	}

	// The plugin exec'd directly, without libcni.
	var direct []time.Duration
	for i := range samples {
		c, err := net.NewContainer(ctx, h2, fmt.Sprintf("direct%d", i))
		if err != nil {
			return err
		}
		err = h2.InNS(func() error {
			cmd := exec.Command(cni)
			cmd.Env = []string{"CNI_COMMAND=ADD", "CNI_CONTAINERID=" + c.ID, "CNI_NETNS=" + c.NetNSPath(), "CNI_IFNAME=eth0", "CNI_PATH=" + filepath.Dir(cni)}
			cmd.Stdin = bytes.NewReader(fmt.Appendf(nil, `{"cniVersion":"1.1.0","name":"overlay","type":"overlay-cni","network":%q,"socket":%q}`, net.Network.Name, h2.Socket))
			t := time.Now()
			out, err := cmd.Output()
			direct = append(direct, time.Since(t))
			if err != nil {
				return fmt.Errorf("direct ADD: %w: %s", err, out)
			}
			return nil
		})
		if err != nil {
			return err
		}
	}

	fmt.Println("\nCNI through libcni, one host (ADD then DEL of a fresh namespace)")
	report("overlay-cni ADD", ovAdd, refAdd, "bridge+host-local ADD")
	report("overlay-cni DEL", ovDel, refDel, "bridge+host-local DEL")
	report("overlay-cni VERSION (bare exec)", bare, nil, "")
	report("overlay-cni ADD exec'd directly", direct, nil, "")
	report("overlayd add, answer when on disk", rpcAdd, nil, "")
	report("overlayd add, early answer", rpcEarly, nil, "")
	report("overlayd del request", rpcDel, nil, "")
	if err := burstAdds(ctx, net, cfg, ovList, refList, burst); err != nil {
		return err
	}
	if err := concurrentAdds(ctx, net, cfg, ovList, concurrent); err != nil {
		return err
	}
	fmt.Println()
	if err := dockerFigures(ctx, net, h1, samples); err != nil {
		return err
	}
	return networkFigures(ctx, net, samples)
}

// burst is how many containers burstAdds starts back to back on one host.
const burst = 200

// burstAdds adds n containers one after the other on host 1 with each
// plugin, interleaved, keeping them all: the overlay's cross three block
// boundaries (61 addresses a /26 block). It reports both bursts' latency,
// the ratio of each one's p99 to its p50, and the ADDs that took the first
// address of a new block.
func burstAdds(ctx context.Context, net *simnet.Net, cfg *libcni.CNIConfig, ovList, refList *libcni.NetworkConfigList, n int) error {
	h := net.Hosts[0]
	var ov, ref, crossing []time.Duration
	var lastBlock netip.Prefix
	for i := range n {
		for _, p := range []struct {
			list *libcni.NetworkConfigList
			name string
		}{{ovList, "bov"}, {refList, "bref"}} {
			c, err := net.NewContainer(ctx, h, fmt.Sprintf("%s%d", p.name, i))
			if err != nil {
				return err
			}
			var res *current.Result
			var took time.Duration
			err = h.InNS(func() error {
				t := time.Now()
				r, err := cfg.AddNetworkList(ctx, p.list, c.RuntimeConf())
				took = time.Since(t)
				if err != nil {
					return fmt.Errorf("burst ADD %s %d: %w", p.name, i, err)
				}
				res, err = current.NewResultFromResult(r)
				return err
			})
			if err != nil {
				return err
			}
			if p.name == "bref" {
				ref = append(ref, took)
				continue
			}
			ov = append(ov, took)
			if len(res.IPs) == 0 {
				return fmt.Errorf("burst ADD %d: no address", i)
			}
			ip, _ := netip.AddrFromSlice(res.IPs[0].Address.IP.To4())
			if b := netip.PrefixFrom(ip, net.Network.BlockBits).Masked(); b != lastBlock {
				if lastBlock.IsValid() {
					crossing = append(crossing, took)
				}
				lastBlock = b
			}
		}
	}
	fmt.Printf("\n%d ADDs back to back on one host, kept (the overlay's cross %d block boundaries)\n", n, len(crossing))
	burstReport("overlay-cni", ov)
	burstReport("bridge+host-local", ref)
	fmt.Printf("  %-34s %v (the overlay's p50 %s)\n", "ADDs into a new block:", roundAll(crossing), round(percentile(ov, 50)))
	return nil
}

func burstReport(name string, d []time.Duration) {
	p50, p99 := percentile(d, 50), percentile(d, 99)
	fmt.Printf("  %-34s p50 %-9s p99 %-9s p99/p50 %.2f\n", name+":", round(p50), round(p99), float64(p99)/float64(p50))
}

func percentile(d []time.Duration, p int) time.Duration {
	s := slices.Clone(d)
	slices.Sort(s)
	return s[min(len(s)-1, len(s)*p/100)]
}

func roundAll(d []time.Duration) []time.Duration {
	out := make([]time.Duration, len(d))
	for i, x := range d {
		out[i] = round(x)
	}
	return out
}

// concurrent is how many ADDs concurrentAdds starts at once.
const concurrent = 100

// concurrentAdds starts n ADDs through libcni at the same moment on one
// host, reports the wall time, and checks that no address is given twice.
func concurrentAdds(ctx context.Context, net *simnet.Net, cfg *libcni.CNIConfig, list *libcni.NetworkConfigList, n int) error {
	h := net.Hosts[1]
	var cs []*simnet.Container
	for i := range n {
		c, err := net.NewContainer(ctx, h, fmt.Sprintf("conc%d", i))
		if err != nil {
			return err
		}
		cs = append(cs, c)
	}
	addrs := make([]string, n)
	errs := make([]error, n)
	var wg sync.WaitGroup
	start := time.Now()
	for i, c := range cs {
		wg.Add(1)
		go func() {
			defer wg.Done()
			errs[i] = h.InNS(func() error {
				r, err := cfg.AddNetworkList(ctx, list, c.RuntimeConf())
				if err != nil {
					return err
				}
				res, err := current.NewResultFromResult(r)
				if err == nil && len(res.IPs) > 0 {
					addrs[i] = res.IPs[0].Address.IP.String()
				}
				return err
			})
		}()
	}
	wg.Wait()
	wall := time.Since(start)
	seen := map[string]int{}
	for i, a := range addrs {
		if errs[i] != nil {
			return fmt.Errorf("concurrent ADD %d: %w", i, errs[i])
		}
		if j, dup := seen[a]; dup {
			return fmt.Errorf("concurrent ADDs %d and %d both got %s", j, i, a)
		}
		seen[a] = i
	}
	fmt.Printf("\n%d concurrent ADDs through libcni on one host: all done in %s, %d distinct addresses\n", n, wall.Round(time.Millisecond), len(seen))
	return nil
}

// deadHostStarts restarts h samples times with two registered hosts whose
// gossip addresses answer nothing, and as often without them, alternating,
// and returns the start-to-ready times without and with. h is left
// running, with the dead hosts' records removed.
func deadHostStarts(ctx context.Context, net *simnet.Net, h *simnet.Host, samples int) (clean, dead []time.Duration, err error) {
	store, closeStore, err := net.Store(ctx)
	if err != nil {
		return nil, nil, err
	}
	defer closeStore()
	var gone []overlay.HostID
	removeGone := func() error {
		for _, id := range gone {
			if err := store.DeleteHost(ctx, id); err != nil {
				return err
			}
		}
		gone = nil
		return nil
	}
	defer removeGone()
	restart := func() (time.Duration, error) {
		if err := h.Stop(); err != nil {
			return 0, err
		}
		t := time.Now()
		err := h.Start(ctx)
		return time.Since(t), err
	}
	for range samples {
		if err := removeGone(); err != nil {
			return nil, nil, err
		}
		d, err := restart()
		if err != nil {
			return nil, nil, err
		}
		clean = append(clean, d)
		if gone, err = simnet.RegisterGoneHosts(ctx, store, 2); err != nil {
			return nil, nil, err
		}
		if d, err = restart(); err != nil {
			return nil, nil, err
		}
		dead = append(dead, d)
	}
	return clean, dead, removeGone()
}

// report prints the median, p90 and max of d, and when base is given the
// same for it and the ratio of the medians.
func report(name string, d, base []time.Duration, baseName string) {
	fmt.Printf("  %-34s %s\n", name+":", stats(d))
	if base != nil {
		fmt.Printf("  %-34s %s\n", baseName+":", stats(base))
		fmt.Printf("  %-34s %.2f\n", "ratio of medians:", float64(median(d))/float64(median(base)))
	}
}

func stats(d []time.Duration) string {
	s := slices.Clone(d)
	slices.Sort(s)
	p90 := s[min(len(s)-1, len(s)*9/10)]
	return fmt.Sprintf("median %-9s p90 %-9s max %-9s (n=%d)", round(median(s)), round(p90), round(s[len(s)-1]), len(s))
}

func median(d []time.Duration) time.Duration {
	s := slices.Clone(d)
	slices.Sort(s)
	return s[len(s)/2]
}

func round(d time.Duration) time.Duration {
	if d > 100*time.Millisecond {
		return d.Round(time.Millisecond)
	}
	return d.Round(10 * time.Microsecond)
}

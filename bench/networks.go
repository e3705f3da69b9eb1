package main

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"os"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/overlaynet/overlay/internal/simnet"
)

// networkFigures prints the figures of networks created at run time.
func networkFigures(ctx context.Context, n *simnet.Net, samples int) error {
	usable, floor, err := newNetworkUsable(ctx, n, samples)
	if err != nil {
		return err
	}
	fmt.Printf("a network created at run time, usable on all %d hosts (overlayctl network create starts to STATUS ready everywhere)\n", len(n.Hosts))
	report("network create to ready", usable, floor, "overlayctl network list")
	fmt.Println()
	// simnet's hosts resync every 2 s: 5 s sees every network pass again.
	return manyNetworks(ctx, n, n.Hosts[0], 50, 5*time.Second)
}

// newNetworkUsable measures how long after the start of `overlayctl
// network create` a new network is ready (STATUS) on every host, against
// `overlayctl network list`, the floor of any command (an exec, a
// connection to etcd and a read), in the same run.
func newNetworkUsable(ctx context.Context, n *simnet.Net, samples int) (usable, floor []time.Duration, err error) {
	for i := range samples {
		t := time.Now()
		if out, err := n.Ctl(ctx, "network", "list"); err != nil {
			return nil, nil, fmt.Errorf("overlayctl network list: %w: %s", err, out)
		}
		floor = append(floor, time.Since(t))
		name := fmt.Sprintf("bn%d", i)
		t = time.Now()
		if out, err := n.Ctl(ctx, "network", "create", name, "--cidr", fmt.Sprintf("10.%d.0.0/16", 100+i)); err != nil {
			return nil, nil, fmt.Errorf("overlayctl network create: %w: %s", err, out)
		}
		if err := readyEverywhere(ctx, n.Hosts, name); err != nil {
			return nil, nil, err
		}
		usable = append(usable, time.Since(t))
		if out, err := n.Ctl(ctx, "network", "delete", name); err != nil {
			return nil, nil, fmt.Errorf("overlayctl network delete: %w: %s", err, out)
		}
	}
	return usable, floor, nil
}

// readyEverywhere waits until every host says network is ready.
func readyEverywhere(ctx context.Context, hosts []*simnet.Host, network string) error {
	ctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	var wg sync.WaitGroup
	errs := make([]error, len(hosts))
	for i, h := range hosts {
		wg.Go(func() { errs[i] = h.WaitNetwork(ctx, network) })
	}
	wg.Wait()
	return errors.Join(errs...)
}

// manyNetworks reports overlayd's memory and its reconcile passes on host
// h with count networks more than it serves now, against the same
// figures before they were created.
func manyNetworks(ctx context.Context, n *simnet.Net, h *simnet.Host, count int, settle time.Duration) error {
	time.Sleep(settle)
	rss0, err := rss(h.Pid())
	if err != nil {
		return err
	}
	pass0, err := lastPasses(h)
	if err != nil {
		return err
	}
	t := time.Now()
	for i := range count {
		name := fmt.Sprintf("m%d", i)
		if out, err := n.Ctl(ctx, "network", "create", name, "--cidr", fmt.Sprintf("10.%d.0.0/16", 150+i)); err != nil {
			return fmt.Errorf("overlayctl network create: %w: %s", err, out)
		}
	}
	for i := range count {
		if err := readyEverywhere(ctx, n.Hosts, fmt.Sprintf("m%d", i)); err != nil {
			return err
		}
	}
	created := time.Since(t)
	time.Sleep(settle) // every network through a resync pass or more
	rss1, err := rss(h.Pid())
	if err != nil {
		return err
	}
	pass1, err := lastPasses(h)
	if err != nil {
		return err
	}
	fmt.Printf("%d networks more on every host (%d created one after another and ready everywhere in %s)\n", count, count, round(created))
	fmt.Printf("  overlayd RSS on %s   %6.1f MiB with %d networks, %6.1f MiB with %d: %.2f MiB per network\n",
		h.Name, float64(rss0)/(1<<20), len(pass0), float64(rss1)/(1<<20), len(pass1), float64(rss1-rss0)/(1<<20)/float64(len(pass1)-len(pass0)))
	fmt.Printf("  reconcile pass, per network   %s with %d networks; %s with %d\n", passStats(pass0), len(pass0), passStats(pass1), len(pass1))
	for i := range count {
		if out, err := n.Ctl(ctx, "network", "delete", fmt.Sprintf("m%d", i)); err != nil {
			return fmt.Errorf("overlayctl network delete: %w: %s", err, out)
		}
	}
	return nil
}

func passStats(d []time.Duration) string {
	var sum time.Duration
	for _, x := range d {
		sum += x
	}
	s := slices.Clone(d)
	slices.Sort(s)
	return fmt.Sprintf("p50 %s max %s, all networks' passes together %s", round(median(s)), round(s[len(s)-1]), round(sum))
}

// rss returns the resident set of process pid, in bytes.
func rss(pid int) (int64, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return 0, err
	}
	for _, l := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(l, "VmRSS:"); ok {
			kb, err := strconv.ParseInt(strings.TrimSuffix(strings.TrimSpace(v), " kB"), 10, 64)
			return kb << 10, err
		}
	}
	return 0, fmt.Errorf("no VmRSS in /proc/%d/status", pid)
}

// lastPasses scrapes host h's overlayd and returns how long each
// network's last reconcile pass took.
func lastPasses(h *simnet.Host) ([]time.Duration, error) {
	var conn net.Conn
	err := h.InNS(func() error {
		var err error
		conn, err = net.DialTimeout("tcp", "127.0.0.1:9476", 5*time.Second)
		return err
	})
	if err != nil {
		return nil, fmt.Errorf("%s: metrics: %w", h.Name, err)
	}
	defer conn.Close()
	fmt.Fprint(conn, "GET /metrics HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
	resp, err := http.ReadResponse(bufio.NewReader(conn), nil)
	if err != nil {
		return nil, fmt.Errorf("%s: metrics: %w", h.Name, err)
	}
	defer resp.Body.Close()
	var out []time.Duration
	sc := bufio.NewScanner(resp.Body)
	for sc.Scan() {
		l := sc.Text()
		if !strings.HasPrefix(l, "overlay_reconcile_last_pass_seconds{") {
			continue
		}
		f := strings.Fields(l)
		v, err := strconv.ParseFloat(f[len(f)-1], 64)
		if err != nil {
			return nil, err
		}
		out = append(out, time.Duration(v*float64(time.Second)))
	}
	if len(out) == 0 {
		return nil, fmt.Errorf("%s: no overlay_reconcile_last_pass_seconds in its metrics", h.Name)
	}
	return out, sc.Err()
}

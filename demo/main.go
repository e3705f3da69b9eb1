// Command demo shows the overlay working on one machine: it builds
// overlayd and overlay-cni, creates simulated hosts (network namespaces
// on a shared underlay bridge) with the embedded etcd, attaches two
// containers per host through the CNI plugin, sends traffic between
// containers on different hosts, prints what every host holds, and
// removes everything. It needs root: sudo ./scripts/demo.
package main

import (
	"context"
	"flag"
	"fmt"
	"io"
	"net/netip"
	"os"
	"os/signal"
	"path/filepath"
	"strings"
	"syscall"
	"text/tabwriter"
	"time"

	"github.com/overlaynet/overlay/internal/simnet"
	"github.com/overlaynet/overlay/ipam/etcd"
)

func main() {
	hosts := flag.Int("hosts", 3, "number of simulated hosts")
	perHost := flag.Int("containers", 2, "containers per host")
	flag.Parse()
	if err := run(*hosts, *perHost); err != nil {
		fmt.Fprintf(os.Stderr, "demo: %v\n", err)
		os.Exit(1)
	}
}

func run(hosts, perHost int) error {
	if os.Geteuid() != 0 {
		return fmt.Errorf("needs root (network namespaces, veth, VXLAN): run sudo ./scripts/demo")
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()
	// Output piped into head must not kill the demo before it cleans up.
	signal.Ignore(syscall.SIGPIPE)

	step("building overlayd and overlay-cni")
	bins, err := simnet.BuildAll(ctx, false)
	if err != nil {
		return err
	}
	defer bins.Remove()
	overlayd, cni := bins.Overlayd, bins.CNI

	step(fmt.Sprintf("creating %d simulated hosts on underlay %s", hosts, simnet.UnderlayCIDR))
	n, err := simnet.New(ctx, simnet.Options{Hosts: hosts, Overlayd: overlayd, CNI: cni})
	if err != nil {
		return err
	}
	defer func() {
		step("cleaning up: stopping overlayd, removing every namespace " + n.Prefix + "*")
		if err := n.Close(); err != nil {
			fmt.Fprintf(os.Stderr, "demo: cleanup: %v\n", err)
		}
	}()

	for _, h := range n.Hosts {
		start := time.Now()
		if err := h.Start(ctx); err != nil {
			return err
		}
		etcdNote := "etcd at " + n.EtcdEndpoint()
		if h.Index == 1 {
			etcdNote = "runs the embedded etcd"
		}
		fmt.Printf("  %s: overlayd ready in %s (%s)\n", h.Name, time.Since(start).Round(time.Millisecond), etcdNote)
	}

	step(fmt.Sprintf("attaching %d containers per host through overlay-cni (libcni)", perHost))
	var cs []*simnet.Container
	for _, h := range n.Hosts {
		for j := 1; j <= perHost; j++ {
			start := time.Now()
			c, err := n.AddContainer(ctx, h, fmt.Sprintf("h%dc%d", h.Index, j))
			if err != nil {
				return err
			}
			fmt.Printf("  %-6s on %-14s %-16s ADD took %s\n", c.ID, h.Name, c.Addr, time.Since(start).Round(100*time.Microsecond))
			cs = append(cs, c)
		}
	}

	step("traffic across hosts")
	if err := waitPing(ctx, cs[0], cs[len(cs)-1].Addr.Addr()); err != nil {
		return err
	}
	for _, from := range cs {
		for _, to := range cs {
			if from.Host == to.Host {
				continue
			}
			out, err := from.Exec(ctx, "ping", "-c", "1", "-W", "2", to.Addr.Addr().String())
			status := "ok"
			if err != nil {
				status = "FAILED"
			}
			fmt.Printf("  %-6s (%s) -> %-6s (%s)  %s  %s\n", from.ID, from.Host.Name, to.ID, to.Host.Name, status, rtt(out))
		}
	}
	if err := tcpTransfer(ctx, cs[0], cs[len(cs)-1]); err != nil {
		return err
	}

	step("what etcd and every host hold")
	return printTables(ctx, n, cs)
}

func step(s string) { fmt.Printf("\n==> %s\n", s) }

func waitPing(ctx context.Context, c *simnet.Container, to netip.Addr) error {
	deadline := time.Now().Add(30 * time.Second)
	for {
		_, err := c.Exec(ctx, "ping", "-c", "1", "-W", "1", to.String())
		if err == nil {
			return nil
		}
		if time.Now().After(deadline) || ctx.Err() != nil {
			return fmt.Errorf("no traffic across hosts after 30s: %w", err)
		}
		time.Sleep(200 * time.Millisecond)
	}
}

func rtt(out []byte) string {
	for _, line := range strings.Split(string(out), "\n") {
		if i := strings.Index(line, "time="); i >= 0 {
			return "rtt " + strings.TrimPrefix(line[i:], "time=")
		}
	}
	return ""
}

// tcpTransfer streams 64 MiB over TCP from one container to another on a
// different host and reports the rate.
func tcpTransfer(ctx context.Context, from, to *simnet.Container) error {
	const size = 64 << 20
	l, err := to.Listen(5001)
	if err != nil {
		return err
	}
	defer l.Close()
	got := make(chan int64, 1)
	go func() {
		c, err := l.Accept()
		if err != nil {
			got <- -1
			return
		}
		defer c.Close()
		n, _ := io.Copy(io.Discard, c)
		got <- n
	}()
	conn, err := from.Dial(ctx, netip.AddrPortFrom(to.Addr.Addr(), 5001))
	if err != nil {
		return err
	}
	start := time.Now()
	conn.SetDeadline(start.Add(time.Minute))
	buf := make([]byte, 256<<10)
	for sent := 0; sent < size; sent += len(buf) {
		if _, err := conn.Write(buf); err != nil {
			conn.Close()
			return fmt.Errorf("tcp transfer: %w", err)
		}
	}
	conn.Close()
	n := <-got
	d := time.Since(start)
	fmt.Printf("  TCP %s -> %s: %d MiB in %s (%.0f Mbit/s) through VXLAN\n", from.ID, to.ID, n>>20, d.Round(time.Millisecond), float64(n)*8/d.Seconds()/1e6)
	if n != size {
		return fmt.Errorf("tcp transfer: received %d of %d bytes", n, size)
	}
	return nil
}

func printTables(ctx context.Context, n *simnet.Net, cs []*simnet.Container) error {
	cli, err := etcd.Connect(ctx, etcd.ClientConfig{Endpoints: []string{n.EtcdEndpoint()}})
	if err != nil {
		return err
	}
	defer cli.Close()
	store := etcd.NewStore(cli, "")
	owners, err := store.Pool(n.Network, "").Owners(ctx)
	if err != nil {
		return err
	}
	recs, err := store.Hosts(ctx)
	if err != nil {
		return err
	}
	w := tabwriter.NewWriter(os.Stdout, 0, 0, 2, ' ', 0)
	fmt.Fprintln(w, "  HOST\tHOST ID\tUNDERLAY\tVTEP MAC\tBLOCK\tPEERS PROGRAMMED")
	for _, h := range n.Hosts {
		idb, _ := os.ReadFile(filepath.Join(h.DataDir, "host-id"))
		id := strings.TrimSpace(string(idb))
		var mac string
		for _, r := range recs {
			if string(r.Host) == id {
				mac = r.VTEPMAC
			}
		}
		var blocks []string
		for b, o := range owners {
			if string(o) == id {
				blocks = append(blocks, b.String())
			}
		}
		out, _ := h.Exec(ctx, "bridge", "fdb", "show", "dev", n.Network.VXLANName())
		peers := strings.Count(string(out), " dst ")
		fmt.Fprintf(w, "  %s\t%s\t%s\t%s\t%s\t%d\n", h.Name, id[:min(12, len(id))], h.Underlay, mac, strings.Join(blocks, ","), peers)
	}
	w.Flush()
	fmt.Println()
	fmt.Fprintln(w, "  CONTAINER\tHOST\tADDRESS\tHOLDER IN ETCD")
	for _, c := range cs {
		holder, err := store.Holder(ctx, n.Network, c.Addr.Addr())
		h := "?"
		if err == nil {
			h = holder.ContainerID + "/" + holder.IfName
		}
		fmt.Fprintf(w, "  %s\t%s\t%s\t%s\n", c.ID, c.Host.Name, c.Addr, h)
	}
	w.Flush()
	return nil
}

package e2e

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"
)

// TestPrometheusScrapes: a real Prometheus (Debian's, which scripts/lib.sh
// unpacks), run in host 1's namespace, scrapes host 1's overlayd, and
// finds the series an operator's alerts and dashboards query; promtool
// check metrics finds nothing wrong in what overlayd serves.
func TestPrometheusScrapes(t *testing.T) {
	prom, err := exec.LookPath("prometheus")
	if err != nil {
		t.Skip("prometheus not found (Debian's prometheus package); scripts/lib.sh unpacks it")
	}
	promtool, err := exec.LookPath("promtool")
	if err != nil {
		t.Skip("promtool not found; scripts/lib.sh unpacks it")
	}
	n := newNet(t, 2)
	h1 := n.Hosts[0]

	// What overlayd serves passes promtool's linter.
	code, body := httpGet(t, h1, "127.0.0.1:9476", "/metrics")
	if code != 200 {
		t.Fatalf("/metrics: %d", code)
	}
	check := exec.Command(promtool, "check", "metrics")
	check.Stdin = strings.NewReader(body)
	if out, err := check.CombinedOutput(); err != nil {
		t.Errorf("promtool check metrics: %v\n%s", err, out)
	}

	rules, err := filepath.Abs(filepath.Join("..", "deploy", "prometheus", "overlay-alerts.yml"))
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	cfg := `global:
  scrape_interval: 1s
  evaluation_interval: 1s
rule_files:
  - ` + rules + `
scrape_configs:
  - job_name: overlayd
    static_configs:
      - targets: ["127.0.0.1:9476"]
`
	if err := os.WriteFile(filepath.Join(dir, "prometheus.yml"), []byte(cfg), 0o600); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(t.Context())
	defer cancel()
	var log bytes.Buffer
	cmd := exec.CommandContext(ctx, "ip", "netns", "exec", h1.Name, prom,
		"--config.file="+filepath.Join(dir, "prometheus.yml"),
		"--storage.tsdb.path="+filepath.Join(dir, "data"),
		"--web.listen-address=127.0.0.1:9090")
	cmd.Stdout, cmd.Stderr = &log, &log
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	cmd.Cancel = func() error { return syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL) }
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() {
		cancel()
		_ = cmd.Wait()
		if t.Failed() {
			t.Logf("prometheus log:\n%s", log.String())
		}
	}()

	// query returns the values of the instant vector expr, by its labels.
	query := func(expr string) (map[string]string, error) {
		code, body, err := tryGet(h1, "127.0.0.1:9090", "/api/v1/query?query="+url.QueryEscape(expr))
		if err != nil {
			return nil, err
		}
		if code != 200 {
			return nil, fmt.Errorf("query %s: %d %s", expr, code, body)
		}
		var resp struct {
			Data struct {
				Result []struct {
					Metric map[string]string `json:"metric"`
					Value  [2]any            `json:"value"`
				} `json:"result"`
			} `json:"data"`
		}
		if err := json.Unmarshal([]byte(body), &resp); err != nil {
			return nil, err
		}
		out := map[string]string{}
		for _, r := range resp.Data.Result {
			out[fmt.Sprint(r.Metric)] = fmt.Sprint(r.Value[1])
		}
		return out, nil
	}
	eventually(t, 60*time.Second, "Prometheus to scrape overlayd", func() error {
		got, err := query(`up{job="overlayd"} == 1`)
		if err != nil || len(got) != 1 {
			return fmt.Errorf("up: %v %v", got, err)
		}
		return nil
	})
	scraped := time.Now()
	for expr, want := range map[string]string{
		`count(overlay_build_info)`:                                         "1",
		`overlay_peers{state="alive"}`:                                      "1",
		`overlay_dataplane_entries{kind="fdb"}`:                             "1",
		`overlay_ipam_blocks`:                                               "1",
		`count(overlay_etcd_grpc_client_handled_total{grpc_code="OK"}) > 0`: "",
		`sum(overlay_gossip_messages_total{direction="received"}) > 0`:      "",
		`time() - overlay_reconcile_last_success_timestamp_seconds < 30`:    "",
	} {
		eventually(t, 20*time.Second, expr, func() error {
			got, err := query(expr)
			if err != nil {
				return err
			}
			if len(got) != 1 {
				return fmt.Errorf("%d series: %v", len(got), got)
			}
			for _, v := range got {
				if want != "" && v != want {
					return fmt.Errorf("= %s, want %s", v, want)
				}
			}
			return nil
		})
	}

	// No alert is firing or pending on the healthy cluster, once every
	// rule has been evaluated with the series scraped: a check before the
	// first evaluation would pass whatever the rules said.
	eventually(t, 30*time.Second, "every alert rule evaluated since the first scrape", func() error {
		code, body, err := tryGet(h1, "127.0.0.1:9090", "/api/v1/rules?type=alert")
		if err != nil || code != 200 {
			return fmt.Errorf("rules: %d %v %s", code, err, body)
		}
		var resp struct {
			Data struct {
				Groups []struct {
					Name  string `json:"name"`
					Rules []struct {
						Name           string    `json:"name"`
						LastEvaluation time.Time `json:"lastEvaluation"`
					} `json:"rules"`
				} `json:"groups"`
			} `json:"data"`
		}
		if err := json.Unmarshal([]byte(body), &resp); err != nil {
			return err
		}
		n := 0
		for _, g := range resp.Data.Groups {
			for _, r := range g.Rules {
				if !r.LastEvaluation.After(scraped) {
					return fmt.Errorf("rule %s not evaluated since %s", r.Name, scraped)
				}
				n++
			}
		}
		if n == 0 {
			return errors.New("no alert rule loaded")
		}
		return nil
	})
	if got, err := query(`ALERTS`); err != nil || len(got) != 0 {
		t.Fatalf("alerts on a healthy cluster: %v %v", got, err)
	}
}

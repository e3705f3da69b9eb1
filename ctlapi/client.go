package ctlapi

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
)

// ErrUnavailable is wrapped by the client's errors when overlayd's socket
// cannot be reached: overlayd is not running on this host, or listens on
// another socket.
var ErrUnavailable = errors.New("overlayd cannot be reached")

// maxAnswer bounds an answer read from overlayd.
const maxAnswer = 16 << 20

// Client talks to the overlayd of this host over its socket.
type Client struct {
	socket string
	hc     *http.Client
}

// NewClient returns a client of the overlayd listening on socket.
func NewClient(socket string) *Client {
	var d net.Dialer
	return &Client{socket: socket, hc: &http.Client{Transport: &http.Transport{
		DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			return d.DialContext(ctx, "unix", socket)
		},
		DisableKeepAlives: true,
	}}}
}

// Status returns the host's status.
func (c *Client) Status(ctx context.Context) (Status, error) {
	var st Status
	err := c.do(ctx, http.MethodGet, StatusPath, nil, &st)
	return st, err
}

// Doctor runs the doctor's checks on the host and returns its report.
func (c *Client) Doctor(ctx context.Context) (Report, error) {
	var r Report
	err := c.do(ctx, http.MethodPost, DoctorPath, nil, &r)
	return r, err
}

// Release releases a leaked address.
func (c *Client) Release(ctx context.Context, req ReleaseRequest) (ReleaseResponse, error) {
	var out ReleaseResponse
	err := c.do(ctx, http.MethodPost, ReleasePath, req, &out)
	return out, err
}

func (c *Client) do(ctx context.Context, method, path string, in, out any) error {
	var body io.Reader
	if in != nil {
		data, err := json.Marshal(in)
		if err != nil {
			return fmt.Errorf("%s: encode the request: %w", path, err)
		}
		body = bytes.NewReader(data)
	}
	req, err := http.NewRequestWithContext(ctx, method, "http://overlayd"+path, body)
	if err != nil {
		return fmt.Errorf("%s: %w", path, err)
	}
	req.Header.Set("Content-Type", "application/json")
	resp, err := c.hc.Do(req)
	if err != nil {
		var op *net.OpError
		if errors.As(err, &op) && op.Op == "dial" {
			return fmt.Errorf("%w at %s (is overlayd running? --socket names its socket): %w", ErrUnavailable, c.socket, err)
		}
		return fmt.Errorf("%s: %w", path, err)
	}
	defer resp.Body.Close()
	data, err := io.ReadAll(io.LimitReader(resp.Body, maxAnswer))
	if err != nil {
		return fmt.Errorf("%s: read the answer: %w", path, err)
	}
	if resp.StatusCode == http.StatusNotFound && !json.Valid(data) {
		return fmt.Errorf("%s: this overlayd does not serve it: upgrade overlayd to overlayctl's version", path)
	}
	if resp.StatusCode/100 != 2 {
		var e ErrorBody
		if json.Unmarshal(data, &e) == nil && e.Error != "" {
			return errors.New(e.Error)
		}
		return fmt.Errorf("%s: overlayd answered %s", path, resp.Status)
	}
	if err := json.Unmarshal(data, out); err != nil {
		return fmt.Errorf("%s: decode the answer: %w", path, err)
	}
	return nil
}

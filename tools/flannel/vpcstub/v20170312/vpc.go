// Package v20170312 stands in for Tencent Cloud's VPC client, which the module
// proxy does not serve, so that flanneld builds for the benchmark. Its
// calls fail: the benchmark runs flannel's vxlan backend only.
package v20170312

import "errors"

var errStub = errors.New("tencentcloud vpc: not built into this flanneld")

// Client is the stand-in VPC client.
type Client struct{}

// NewClientWithSecretId fails: there is no VPC client here.
func NewClientWithSecretId(secretID, secretKey, region string) (*Client, error) {
	return nil, errStub
}

// Filter is a route table filter.
type Filter struct {
	Name   *string
	Values []*string
}

// Route is a VPC route.
type Route struct {
	RouteId              *uint64
	DestinationCidrBlock *string
	GatewayType          *string
	GatewayId            *string
	RouteType            *string
	Enabled              *bool
}

// RouteTable is a VPC route table.
type RouteTable struct {
	RouteTableId *string
	RouteSet     []*Route
}

// DescribeRouteTablesRequest asks for route tables.
type DescribeRouteTablesRequest struct{ Filters []*Filter }

// DescribeRouteTablesResponse holds route tables.
type DescribeRouteTablesResponse struct {
	Response *struct{ RouteTableSet []*RouteTable }
}

// NewDescribeRouteTablesRequest returns an empty request.
func NewDescribeRouteTablesRequest() *DescribeRouteTablesRequest {
	return &DescribeRouteTablesRequest{}
}

// DescribeRouteTables fails.
func (c *Client) DescribeRouteTables(*DescribeRouteTablesRequest) (*DescribeRouteTablesResponse, error) {
	return nil, errStub
}

// DeleteRoutesRequest asks to delete routes.
type DeleteRoutesRequest struct {
	RouteTableId *string
	Routes       []*Route
}

// NewDeleteRoutesRequest returns an empty request.
func NewDeleteRoutesRequest() *DeleteRoutesRequest { return &DeleteRoutesRequest{} }

// DeleteRoutes fails.
func (c *Client) DeleteRoutes(*DeleteRoutesRequest) (struct{}, error) { return struct{}{}, errStub }

// CreateRoutesRequest asks to create routes.
type CreateRoutesRequest struct {
	RouteTableId *string
	Routes       []*Route
}

// NewCreateRoutesRequest returns an empty request.
func NewCreateRoutesRequest() *CreateRoutesRequest { return &CreateRoutesRequest{} }

// CreateRoutes fails.
func (c *Client) CreateRoutes(*CreateRoutesRequest) (struct{}, error) { return struct{}{}, errStub }
